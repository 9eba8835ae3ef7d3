"""A checkpoint from `stts-vllm train --data` (scorer mode: the base linked, the scorer trained)
loads in vLLM and answers through `stts-serve` with the training model's own numbers: the
server decodes the clip into the frames training used, and its first token's log-probabilities
equal the training model's at the same keep ratio."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from media import encode_video, moving_square_video

from stts_vllm.demo import make_demo
from stts_vllm.media.sampling import FrameSampling
from stts_vllm.training.model import STTSVideoQAModel
from stts_vllm.training.sft_config import SFTConfig
from stts_vllm.training.sft_data import read_records
from stts_vllm.training.sft_samples import RecordPreparer
from stts_vllm.training.sft_train import train_sft
from tests.processes import free_port, server_env, server_process

QUESTION = "What moves?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sft-serve")
    init = make_demo(root / "init")
    rows = []
    for i in range(3):
        (root / f"c{i}.mp4").write_bytes(
            encode_video(moving_square_video(12, 64, 80, seed=i), fps=4)
        )
        conversation = [
            {"from": "human", "value": f"<video>\n{QUESTION}"},
            {"from": "gpt", "value": f"Square {i}."},
        ]
        rows.append({"video": f"c{i}.mp4", "conversations": conversation})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = SFTConfig(
        init=init,
        out=root / "out",
        data=(root / "data.jsonl",),
        video_root=root,
        steps=4,
        warmup=1,
        scorer_lr=1e-2,
        max_tokens_per_step=200,
        workers=0,
    )
    return train_sft(config)


@pytest.fixture(scope="module")
def url(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", str(trained), "--port", str(port)]
    log = tmp_path_factory.mktemp("sft-serve-log") / "server.log"
    with server_process(argv, f"http://127.0.0.1:{port}", "/ready", log, server_env()):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_the_trained_checkpoint_answers_with_the_training_models_numbers(
    trained: Path, url: str, keep: float
) -> None:
    clip = trained.parent.parent / "c1.mp4"
    body = {
        "model": "stts-demo",
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 5,
        "return_tokens_as_token_ids": True,  # vLLM's: each token as "token_id:N"
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "video_url",
                        "video_url": {
                            "url": "data:video/mp4;base64,"
                            + base64.b64encode(clip.read_bytes()).decode()
                        },
                    },
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "stts": {"keep_ratio": keep, "test_time_scaling": False},
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    reply = response.json()
    (video,) = reply["stts"]["videos"]
    assert (video["video_tokens_after"] < video["video_tokens_before"]) == (keep < 1.0)

    # the training model, on the record the clip came from, at the same keep
    raw = {"video": str(clip), "conversations": [
        {"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": "x"},
    ]}  # fmt: skip
    (trained.parent / "one.jsonl").write_text(json.dumps(raw) + "\n")
    (record,), _ = read_records([trained.parent / "one.jsonl"], None)
    sample = RecordPreparer(trained, FrameSampling())(record)
    model = STTSVideoQAModel.from_checkpoint(trained).eval()
    with torch.no_grad():
        out = model([sample], [keep])
    assert out.video_tokens == [video["video_tokens_after"]]
    hf = torch.log_softmax(out.answer_logits[0].float(), dim=-1)
    (token,) = reply["choices"][0]["logprobs"]["content"]
    assert len(token["top_logprobs"]) == 5
    for top in token["top_logprobs"]:
        token_id = int(top["token"].removeprefix("token_id:"))
        assert abs(top["logprob"] - float(hf[token_id])) < 1e-3, (top, float(hf[token_id]))
    assert int(token["token"].removeprefix("token_id:")) == int(hf.argmax())
