"""Server flags: `--engine-args` passes any other vLLM knob through, and refuses bad ones at
start-up with a message naming them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic_settings import CliApp

from server.engine import EngineService
from server.settings import Settings
from stts_vllm.demo import make_demo


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("settings") / "model")


def _settings(*argv: str) -> Settings:
    return CliApp.run(Settings, cli_args=list(argv))


def test_engine_args_reach_vllm(demo_checkpoint) -> None:
    settings = _settings(
        "--model",
        str(demo_checkpoint),
        "--tensor-parallel-size",
        "2",
        "--engine-args",
        '{"data_parallel_size": 3, "kv_cache_dtype": "fp8", "enable_prefix_caching": false}',
    )
    args = EngineService(settings).engine_args()
    assert (args.tensor_parallel_size, args.data_parallel_size) == (2, 3)
    assert args.kv_cache_dtype == "fp8" and args.enable_prefix_caching is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('{"tensor_paralel_size": 2}', "not vLLM engine arguments: ['tensor_paralel_size']"),
        ('{"max_model_len": 64}', "use --max-model-len"),
    ],
)
def test_bad_engine_args_stop_the_server_at_start(demo_checkpoint, extra: str, message: str):
    _assert_refused_at_start(demo_checkpoint, ["--engine-args", extra], message)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--enable-auto-tool-choice"], "requires --tool-call-parser"),
        (["--tool-call-parser", "hermez"], "--tool-call-parser 'hermez': one of"),
        (["--encoder-patch-budget", "0"], "greater than or equal to 1"),
    ],
)
def test_bad_tool_flags_stop_the_server_at_start(demo_checkpoint, flags: list, message: str):
    _assert_refused_at_start(demo_checkpoint, flags, message)


def _assert_refused_at_start(demo_checkpoint, flags: list[str], message: str) -> None:
    argv = ["--model", str(demo_checkpoint), *flags]
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_a_taken_port_stops_the_server_before_its_engine_starts(demo_checkpoint) -> None:
    """The port is bound before the engine loads: a clash is reported at once (and no port
    the engine's own processes pick while starting can take the server's)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--model", str(demo_checkpoint), "--host", "127.0.0.1", "--port", str(port)]
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "address already in use" in output.lower(), output[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "engine ready" not in output and "Initializing a V1 LLM engine" not in output
