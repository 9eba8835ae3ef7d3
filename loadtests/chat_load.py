"""Load test of the real server: a concurrency sweep of streaming video chat requests.

    .venv/bin/python loadtests/chat_load.py --launch --concurrency 1 2 4 8 16 --out artifacts/load

With `--launch` it starts `stts-serve` itself, once per configuration, on 127.0.0.1:
`unpruned` (keep 1.0 per request), `stts` (keep 0.5), `evs` (the stock architecture over the
same weights with vLLM's `video_pruning_rate` 0.5), each on the same checkpoint (default: the
demo); `--configs` picks them, and `stts-sequential` (keep 0.5, one pruned-tower call per
video, as vLLM's runner encodes videos for pruning models) and `stock` (vLLM's own model, no
pruning, against which `unpruned` shows what the plugin costs) are there to compare with. Without
it, `--url` names one running server (loopback only) and `--keep` the ratio.
Every conversation gets a clip of its own (lengths cycle through `--video-seconds`; the same
clips for every configuration), uploaded through `/v1/files` before the clock starts, so no
request is served from another's cache; `--turns N` asks N questions about each clip in one
conversation (history resent, as a chat client does) to show prefix / encoder cache reuse,
reported as TTFT of first vs later turns.
Reports throughput (req/s, output tok/s), TTFT and latency p50/p95/p99, errors, the share
of request time spent decoding video, and the pruned tower's calls and seconds per video (from
the server's own metrics). Bounded in requests and
seconds. Writes `load.json` and `load.png`; `--smoke` is a seconds-long check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
API_KEY = "load-test"


@dataclass
class Sample:
    ok: bool
    latency: float
    ttft: float | None
    output_tokens: int
    video_tokens: int
    status: int
    turn: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    config: str
    concurrency: int
    wall_seconds: float
    samples: list[Sample] = field(default_factory=list)
    decode_seconds: float = 0.0
    request_seconds: float = 0.0
    encoder: dict[str, float] = field(default_factory=dict)  # deltas of stts_encoder_*

    def summary(self) -> dict[str, Any]:
        good = [s for s in self.samples if s.ok]
        lat = sorted(s.latency for s in good)
        ttft = sorted(s.ttft for s in good if s.ttft is not None)
        tokens = sum(s.output_tokens for s in good)
        return {
            "config": self.config,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "errors": len(self.samples) - len(good),
            "error_examples": sorted({s.error for s in self.samples if s.error})[:3],
            "wall_seconds": self.wall_seconds,
            "requests_per_second": len(good) / self.wall_seconds if self.wall_seconds else 0.0,
            "output_tokens_per_second": tokens / self.wall_seconds if self.wall_seconds else 0.0,
            "latency_seconds": percentiles(lat),
            "ttft_seconds": percentiles(ttft),
            "ttft_first_turn_seconds": percentiles(
                sorted(s.ttft for s in good if s.ttft is not None and s.turn == 0)
            ),
            "ttft_later_turns_seconds": percentiles(
                sorted(s.ttft for s in good if s.ttft is not None and s.turn > 0)
            ),
            "video_tokens_mean": statistics.mean(s.video_tokens for s in good) if good else 0,
            "decode_share_of_request_time": (
                self.decode_seconds / self.request_seconds if self.request_seconds else None
            ),
            # the pruned tower (STTS servers): calls per video (1 when videos are encoded one
            # at a time) and its time per video
            "encoder_calls_per_video": _per(self.encoder, "stts_encoder_calls_total"),
            "encoder_seconds_per_video": _per(self.encoder, "stts_encoder_seconds_total"),
        }


def _per(encoder: dict[str, float], name: str) -> float | None:
    videos = encoder.get("stts_encoder_videos_total", 0.0)
    return encoder.get(name, 0.0) / videos if videos else None


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    q = np.percentile(values, [50, 95, 99])
    return {"p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2])}


# --------------------------------------------------------------------------- media


def make_video(seconds: float, fps: int = 4, size: int = 224, seed: int = 0) -> bytes:
    """An mp4 (H.264) of a drifting square on a textured background, made with PyAV."""
    import av

    rng = np.random.default_rng(seed)
    background = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(max(1, int(seconds * fps))):
            frame = background.copy()
            y, x = (5 * i) % (size - 40), (9 * i) % (size - 40)
            frame[y : y + 40, x : x + 40] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


async def upload(client: httpx.AsyncClient, data: bytes, name: str) -> str:
    files = {"file": (name, data, "video/mp4")}
    response = await client.post("/v1/files", files=files, data={"purpose": "vision"})
    response.raise_for_status()
    return response.json()["id"]


# --------------------------------------------------------------------------- requests

QUESTIONS = ["What happens in the video?", "What color is the square?", "Where does it go?"]


async def one_request(
    client: httpx.AsyncClient,
    model: str,
    messages: list[dict],
    keep: float,
    max_tokens: int,
    headers: dict[str, str] | None = None,
) -> tuple[Sample, str]:
    """One streaming chat completion; returns the measurement and the answer's text."""
    body = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "messages": messages,
        "stts": {"keep_ratio": keep, "test_time_scaling": False},
    }
    start = time.perf_counter()
    ttft = None
    tokens = video_tokens = 0
    answer: list[str] = []
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                elapsed = time.perf_counter() - start
                return Sample(False, elapsed, None, 0, 0, response.status_code, error=text), ""
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # the server's mid-stream error event
                    message = str(chunk["error"].get("message"))[:200]
                    elapsed = time.perf_counter() - start
                    return Sample(False, elapsed, ttft, 0, 0, 200, error=message), ""
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        answer.append(choice["delta"]["content"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("stts"):
                    video_tokens = chunk["stts"]["video_tokens_after"]
    except httpx.HTTPError as error:
        return Sample(False, time.perf_counter() - start, ttft, 0, 0, 0, error=repr(error)), ""
    return Sample(True, time.perf_counter() - start, ttft, tokens, video_tokens, 200), "".join(
        answer
    )


async def conversation(
    client: httpx.AsyncClient,
    model: str,
    file_id: str,
    keep: float,
    turns: int,
    max_tokens: int,
    headers: dict[str, str] | None = None,
) -> list[Sample]:
    """`turns` questions about one video, each sent with the history so far, as a chat client
    would: later turns share the video's prefix with the first (prefix and encoder caches).
    `headers` go with every turn (a router's session key)."""
    messages: list[dict] = []
    samples = []
    for turn in range(turns):
        question = QUESTIONS[turn % len(QUESTIONS)]
        if turn == 0:
            content: str | list[dict] = [
                {"type": "video_url", "video_url": {"url": file_id}},
                {"type": "text", "text": question},
            ]
        else:
            content = question
        messages.append({"role": "user", "content": content})
        sample, answer = await one_request(client, model, messages, keep, max_tokens, headers)
        sample.turn = turn
        samples.append(sample)
        if not sample.ok:
            break
        messages.append({"role": "assistant", "content": answer})
    return samples


async def metric_sums(client: httpx.AsyncClient) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    wanted = {
        "stts_video_decode_seconds_sum",
        "stts_request_duration_seconds_sum",
        "stts_encoder_calls_total",
        "stts_encoder_videos_total",
        "stts_encoder_seconds_total",
    }
    sums: dict[str, float] = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                sums[sample.name] += sample.value
    return sums


@functools.cache
def clip(seconds: float, seed: int) -> bytes:
    return make_video(seconds, seed=seed)


async def run_level(
    url: str, config: str, keep: float, concurrency: int, level: int, args: argparse.Namespace
) -> LevelResult:
    """One concurrency level on videos of its own: every conversation gets a distinct clip (the
    same clips for every configuration), so caches help only within a conversation, as with
    real traffic; the clips are uploaded before the clock starts and deleted after."""
    requests = max(args.requests_per_level, concurrency * 2)
    conversations = -(-requests // args.turns)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=600, limits=limits
    ) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        lengths = args.video_seconds
        files = [
            await upload(
                client,
                clip(lengths[i % len(lengths)], 1000 * level + i),
                f"clip-{level}-{i}.mp4",
            )
            for i in range(conversations)
        ]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for file_id in files:
            queue.put_nowait(file_id)
        result = LevelResult(config, concurrency, 0.0)
        before = await metric_sums(client)
        deadline = time.perf_counter() + args.time_limit

        async def worker() -> None:
            while not queue.empty() and time.perf_counter() < deadline:
                result.samples += await conversation(
                    client, model, queue.get_nowait(), keep, args.turns, args.max_tokens
                )

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_seconds = time.perf_counter() - start
        after = await metric_sums(client)
        result.decode_seconds = (
            after["stts_video_decode_seconds_sum"] - before["stts_video_decode_seconds_sum"]
        )
        result.request_seconds = (
            after["stts_request_duration_seconds_sum"] - before["stts_request_duration_seconds_sum"]
        )
        result.encoder = {
            name: after[name] - before[name] for name in after if name.startswith("stts_encoder")
        }
        for file_id in files:
            (await client.delete(f"/v1/files/{file_id}")).raise_for_status()
    return result


# --------------------------------------------------------------------------- servers


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"load tests only target 127.0.0.1 (got {host!r})")
    return url.rstrip("/")


def launch(
    checkpoint: Path,
    port: int,
    log: Path,
    engine_args: dict,
    files_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`stts-serve` on 127.0.0.1:`port`, ready; uploads in `files_dir` (default: its own),
    `env` added to this environment."""
    argv = [
        sys.executable,
        "-m",
        "server.cli",
        "--model",
        str(checkpoint),
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--max-in-flight",
        "256",
    ]
    if engine_args:
        argv += ["--engine-args", json.dumps(engine_args)]
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    environ["STTS_FILES_DIR"] = str(files_dir or log.parent / f"files-{port}")
    environ |= env or {}
    # A process group of its own: killing the group takes vLLM's engine processes with it.
    process = subprocess.Popen(
        argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environ, start_new_session=True
    )
    wait_until_ready(process, port, log)
    return process


def wait_until_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    """Until `/ready` answers 200; exits the load test if the server dies or takes 600 s."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"server did not become ready in 600 s; see {log}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(kw_only=True)
class CrashableServer:
    """A server started in a process group of its own (`launch`, or the tests'
    `server_process(own_group=True)`), which a fault test crashes and restarts."""

    process: subprocess.Popen | None = None
    orphans: list[int] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL to the server process: it crashes. vLLM's engine processes are left
        orphaned (a container runtime would take them down with it); `reap` ends them."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.orphans.append(self.process.pid)  # the group it leads

    def reap(self) -> None:
        """Ends the engine groups `kill` left, when the caller chooses: after the restart
        (a fault test measures the restart under load, not the clean-up) or at teardown."""
        for group in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self.orphans.clear()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def sweep(
    url: str, config: str, keep: float, args: argparse.Namespace, summaries: list[dict]
) -> None:
    """All concurrency levels against one server; each level's summary is saved as it ends."""
    for level, concurrency in enumerate(args.concurrency):
        result = await run_level(url, config, keep, concurrency, level, args)
        summary = result.summary()
        summaries.append(summary)
        save(summaries, args)
        print(
            f"{config:9} c={concurrency:<3} {summary['requests_per_second']:.2f} req/s "
            f"{summary['output_tokens_per_second']:.1f} tok/s "
            f"p50 {summary['latency_seconds']['p50']} errors {summary['errors']}",
            file=sys.stderr,
        )


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a third panel where the server reported its pruned-tower calls (`stts_encoder_*`)
    towers = any(s.get("encoder_calls_per_video") is not None for s in summaries)
    fig, axes = plt.subplots(1, 3 if towers else 2, figsize=(16 if towers else 11, 4))
    colors = {
        "unpruned": "#555555",
        "stts": "#2e7d32",
        "stts-sequential": "#81c784",
        "evs": "#e6a03c",
        "stock": "#9e9e9e",
        "server": "#1f77b4",
    }
    for config in sorted({s["config"] for s in summaries}):
        rows = sorted(
            (s for s in summaries if s["config"] == config), key=lambda s: s["concurrency"]
        )
        conc = [s["concurrency"] for s in rows]
        color = colors.get(config)
        p50 = [s["latency_seconds"]["p50"] or 0 for s in rows]
        p95 = [s["latency_seconds"]["p95"] or 0 for s in rows]
        axes[0].plot(
            conc, [s["requests_per_second"] for s in rows], "o-", color=color, label=config
        )
        axes[1].plot(conc, p50, "o-", color=color, label=f"{config} p50")
        axes[1].plot(conc, p95, "x--", color=color, label=f"{config} p95")
        calls = [s.get("encoder_calls_per_video") for s in rows]
        if towers and any(c is not None for c in calls):
            axes[2].plot(  # a level without pruned videos is left out, not drawn as 0
                conc,
                [float("nan") if c is None else c for c in calls],
                "o-",
                color=color,
                label=config,
            )
    axes[0].set_title("throughput vs concurrency")
    axes[0].set_ylabel("requests / s")
    axes[1].set_title("latency vs concurrency")
    axes[1].set_ylabel("seconds")
    if towers:
        axes[2].set_title("pruned-tower calls per video")
        axes[2].set_ylabel("calls / video")
        axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets(summaries: list[dict]) -> list[dict]:
    def at(config: str, concurrency: int) -> dict | None:
        return next(
            (s for s in summaries if s["config"] == config and s["concurrency"] == concurrency),
            None,
        )

    out = []
    stts, base = at("stts", 8), at("unpruned", 8)
    if stts and base and base["requests_per_second"]:
        value = stts["requests_per_second"] / base["requests_per_second"]
        out.append(
            {
                "target": "throughput STTS vs unpruned @8",
                "goal": 1.6,
                "measured": value,
                "met": value >= 1.6,
            }
        )
    shares = [
        s["decode_share_of_request_time"]
        for s in summaries
        if s["decode_share_of_request_time"] is not None
    ]
    if shares:
        worst = max(shares)
        out.append(
            {
                "target": "video decoding share of request time",
                "goal": 0.10,
                "measured": worst,
                "met": worst <= 0.10,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="store_true", help="start servers: unpruned, stts, evs")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a fresh demo")
    parser.add_argument("--url", default=None, help="a running server (127.0.0.1 only)")
    parser.add_argument("--keep", type=float, default=0.5, help="keep ratio with --url")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level")
    parser.add_argument("--video-seconds", type=float, nargs="+", default=[4.0, 10.0, 30.0])
    parser.add_argument("--turns", type=int, default=1, help="questions per video in a row")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("artifacts/load"))
    parser.add_argument(
        "--engine-args",
        type=json.loads,
        default={},
        help="JSON of vLLM engine arguments for every launched server (stts-serve --engine-args)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=["unpruned", "stts", "stts-sequential", "evs", "stock"],
        default=["unpruned", "stts", "evs"],
        help="servers --launch starts, in order",
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long: c=1,2, 2 requests")
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.requests_per_level, args.video_seconds = [1, 2], 2, [2.0]
        args.max_tokens, args.time_limit = 4, 60.0
    args.out.mkdir(parents=True, exist_ok=True)

    summaries: list[dict] = []
    if not args.launch:
        url = check_loopback(args.url or "http://127.0.0.1:8000")
        asyncio.run(sweep(url, "server", args.keep, args, summaries))
    else:
        from stts_vllm.checkpoint import derive
        from stts_vllm.demo import make_demo

        tmp = Path(tempfile.mkdtemp(prefix="stts-load-"))
        checkpoint = args.checkpoint or make_demo(tmp / "demo")
        stock = derive(checkpoint, tmp / "stock", stock=True)
        # name: checkpoint, keep ratio, engine arguments, environment
        available = {
            "unpruned": (checkpoint, 1.0, {}, {}),
            "stts": (checkpoint, 0.5, {}, {}),
            # a patch budget of one patch: one pruned-tower call per video, as vLLM's
            # runner encodes videos for pruning models
            "stts-sequential": (checkpoint, 0.5, {}, {"STTS_ENCODER_PATCH_BUDGET": "1"}),
            "evs": (stock, 1.0, {"video_pruning_rate": 0.5}, {}),
            # vLLM's own model: what `unpruned` (the plugin at keep 1.0) must match
            "stock": (stock, 1.0, {}, {}),
        }
        for name in args.configs:
            path, keep, engine_args, env = available[name]
            port = free_port()
            log = args.out / f"server-{name}.log"
            process = launch(path, port, log, args.engine_args | engine_args, env=env)
            try:
                asyncio.run(sweep(f"http://127.0.0.1:{port}", name, keep, args, summaries))
            finally:
                stop(process)
            if process.returncode not in (0, -15):
                print(f"{name}: server exited {process.returncode}; see {log}", file=sys.stderr)
    result = save(summaries, args)
    for t in result["targets"]:
        status = "met" if t["met"] else "MISSED"
        print(f"target {t['target']}: goal {t['goal']}, measured {t['measured']:.3f} -> {status}")
    print(f"wrote {args.out / 'load.json'} and load.png")


def save(summaries: list[dict], args: argparse.Namespace) -> dict:
    """Writes the report so far (a level that ends is never lost to a later failure)."""
    result = {
        "machine": {"cores": os.cpu_count()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "levels": summaries,
        "targets": targets(summaries),
    }
    (args.out / "load.json").write_text(json.dumps(result, indent=2))
    plot(summaries, args.out / "load.png")
    return result


if __name__ == "__main__":
    main()
