"""`stts-vllm convert` output loads in vLLM as is: stock weights linked, scorer added."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from media import chat_prompt, moving_square_video, video_item

from stts_vllm.core import retained_count
from tests.engine.helpers import live_model


@pytest.fixture(scope="module")
def converted(
    stock_ckpt: Path, learned_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("converted") / "stts"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stts_vllm.cli",
            "convert",
            str(stock_ckpt),
            str(out),
            "--keep-ratio",
            "0.3",
            "--prune-at",
            "2",
            "--scorer-weights",
            str(learned_ckpt / "stts_scorer.safetensors"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def test_converted_checkpoint_serves_pruned_video(engines, converted: Path) -> None:
    from vllm import SamplingParams

    assert (converted / "model.safetensors").is_symlink()
    llm = engines.get(converted)
    model = live_model(llm)
    assert model.stts_config.scorer == "learned" and model.stts_config.prune_at == 2
    frames = moving_square_video(8, 140, 140, seed=31)
    (out,) = llm.generate(
        [{"prompt": chat_prompt("video"), "multi_modal_data": {"video": [video_item(frames)]}}],
        SamplingParams(temperature=0, max_tokens=4),
        use_tqdm=False,
    )
    assert out.prompt_token_ids.count(1007) == retained_count(4, 25, 0.3)
    assert len(out.outputs[0].token_ids) > 0
