"""A fine-tuning record as the model trains on it: the checkpoint's chat template, the loss on
exactly the assistant's tokens, and the very frames the server plans and decodes for the same
file and settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from media import encode_video, image, moving_square_video

from stts_vllm.demo import make_demo
from stts_vllm.media.sampling import FrameSampling
from stts_vllm.training.model import STTSVideoQAModel
from stts_vllm.training.sft_data import read_records
from stts_vllm.training.sft_samples import RecordPreparer, tokenize_record

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
TWO_TURNS = {
    "video": "clip.mp4",
    "conversations": [
        {"from": "human", "value": "<video>\nWhat moves?"},
        {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Which way?"},
        {"from": "gpt", "value": "Right."},
    ],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sft-samples")
    # 5 s at 6 fps, 70x90: the frame plan has to pick and resize
    (root / "clip.mp4").write_bytes(encode_video(moving_square_video(30, 70, 90), fps=6))
    image(40, 56, seed=3).save(root / "still.png")
    for family in FAMILIES:
        make_demo(root / family, family=family)
    return root


def _record(root: Path, raw: dict, name: str = "data.jsonl"):
    (root / name).write_text(json.dumps(raw) + "\n")
    (record,), _ = read_records([root / name], root)
    return record


@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_the_assistant_tokens_carry_loss(root: Path, family: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / family)
    tokenized = tokenize_record(tokenizer, _record(root, TWO_TURNS))
    spans: list[tuple[bool, list[int]]] = []
    for token, target in zip(tokenized.ids, tokenized.labels, strict=True):
        if not spans or spans[-1][0] != target:
            spans.append((target, []))
        spans[-1][1].append(token)
    decoded = [(target, tokenizer.decode(ids)) for target, ids in spans]
    assert decoded == [
        (
            False,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (True, "A square.<|im_end|>"),
        (False, "\n<|im_start|>user\nWhich way?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Right.<|im_end|>"),
        (False, "\n"),
    ]
    assert [tokenized.ids[i] for i in tokenized.media_at] == [
        tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ]


@pytest.mark.parametrize("max_pixels", [None, 28 * 28 * 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_frames_are_the_servers_frames(
    root: Path, family: str, max_pixels: int | None
) -> None:
    """The same file and settings (sampling, and `--frame-max-pixels` where set): the server's
    loader plans and decodes the same frame times, size and pixels as a training sample."""
    from server.engine import read_model_facts
    from server.file_store import FileStore
    from server.media import MediaLoader
    from server.settings import Settings
    from stts_vllm.media.video import read_video

    settings = Settings(
        model=root / family, fps=3.0, max_frames=12, media_root=root, frame_max_pixels=max_pixels
    )
    store = FileStore(
        root / f"files-{family}-{max_pixels}",
        max_files=4,
        max_bytes=1 << 20,
        max_file_bytes=1 << 20,
    )
    geometry = read_model_facts(settings).geometry  # what the server starts with
    loader = MediaLoader(settings, store, geometry)

    async def served():
        prepared = await loader.prepare_video(
            f"file://{root}/clip.mp4",
            fps=settings.fps,
            num_frames=None,
            max_frames=settings.max_frames,
            keep_ratio=0.5,
            test_time_scaling=False,
        )
        return await loader.load_video(prepared)

    server_video = asyncio.run(served())
    sampling = FrameSampling(fps=3.0, min_frames=settings.min_frames, max_frames=12)
    preparer = RecordPreparer(root / family, sampling, pixels=(None, max_pixels))
    trained = read_video(root / "clip.mp4", preparer.geometry, sampling)
    assert trained.plan == server_video.plan and trained.plan.num_frames == 12
    assert np.array_equal(trained.frames, server_video.frames)
    assert trained.fps == server_video.fps
    if max_pixels is not None:  # the override was in force: smaller frames than the default
        assert trained.plan.size[0] * trained.plan.size[1] <= max_pixels

    # and through a whole record: the sample's pixels are those frames through the processor
    prepared = preparer(_record(root, TWO_TURNS))
    times = trained.times if geometry.timestamped else None
    expected = preparer.inputs.video(server_video.frames, server_video.fps, times)
    assert torch.equal(prepared.media[0].pixel_values, expected.pixel_values)
    assert prepared.media[0].step_texts == expected.step_texts


@pytest.mark.parametrize("family", FAMILIES)
def test_a_record_with_videos_and_an_image_trains(root: Path, family: str) -> None:
    """Two videos and an image in one turn, two answers: one forward pass, a finite loss over
    both answers' tokens, the videos pruned, the image not."""
    raw = {
        "video": ["clip.mp4", "clip.mp4"],
        "image": "still.png",
        "conversations": [
            {"from": "human", "value": "<video> and <video>, then <image>: same?"},
            {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Quite."},
        ],
    }
    record = _record(root, raw, "mixed.jsonl")
    sample = RecordPreparer(root / family, FrameSampling(max_frames=8))(record)
    assert [m.kind for m in sample.media] == ["video", "video", "image"]
    model = STTSVideoQAModel.from_checkpoint(root / family)
    full = model([sample], [1.0])
    pruned = model([sample], [0.5])
    assert torch.isfinite(pruned.loss) and pruned.loss.requires_grad
    assert pruned.video_tokens[0] < full.video_tokens[0]
    assert pruned.sample_losses.shape == (1,)
    pruned.loss.backward()
    assert model.scorer is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scorer.parameters())


def test_an_openai_record_trains_as_its_llava_twin(root: Path) -> None:
    """A served request logged as training data: the same ids, labels and media as the same
    conversation in the LLaVA layout."""
    from transformers import AutoTokenizer

    openai = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": "clip.mp4"}},
                    {"type": "text", "text": "What moves?"},
                ],
            },
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "Which way?"},
            {"role": "assistant", "content": "Right."},
        ]
    }
    tokenizer = AutoTokenizer.from_pretrained(root / "qwen3_vl")
    llava = tokenize_record(tokenizer, _record(root, TWO_TURNS))
    served = tokenize_record(tokenizer, _record(root, openai, "openai.jsonl"))
    assert served == llava
