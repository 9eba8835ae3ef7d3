"""keep_ratio < 1 through the real engine: placeholder counts, positions, mixed batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from media import chat_prompt, image, moving_square_video, video_item

from stts_vllm.core import mrope_positions, retained_count
from tests.engine.helpers import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_START,
    Recorder,
    check_video_positions,
    demo_units,
    live_model,
)


def _generate(llm: Any, prompts: list[dict[str, Any]], max_tokens: int = 6) -> list[Any]:
    from vllm import SamplingParams

    return llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False
    )


def _video_prompt(frames: int, h: int, w: int, keep: float | None = None, seed: int = 0) -> dict:
    prompt: dict[str, Any] = {
        "prompt": chat_prompt("video"),
        "multi_modal_data": {"video": [video_item(moving_square_video(frames, h, w, seed=seed))]},
    }
    if keep is not None:
        prompt["mm_processor_kwargs"] = {"stts_keep_ratio": keep}
    return prompt


@pytest.fixture
def llm(engines, demo_ckpt: Path) -> Any:
    return engines.get(demo_ckpt)


def test_placeholder_count_is_the_count_function(llm: Any) -> None:
    out_default, out_03 = _generate(
        llm, [_video_prompt(12, 140, 196), _video_prompt(12, 140, 196, keep=0.3, seed=1)]
    )
    t, h, w = demo_units(12, 140, 196)
    assert out_default.prompt_token_ids.count(VIDEO_TOKEN) == retained_count(t, h * w, 0.5)
    assert out_03.prompt_token_ids.count(VIDEO_TOKEN) == retained_count(t, h * w, 0.3)
    assert retained_count(t, h * w, 0.3) < retained_count(t, h * w, 0.5) < t * h * w
    assert all(len(o.outputs[0].token_ids) > 0 for o in (out_default, out_03))


def test_kept_units_keep_their_original_positions(
    llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(live_model(llm), monkeypatch)
    (out,) = _generate(llm, [_video_prompt(10, 168, 224, keep=0.5, seed=2)])
    (mask,) = rec.masks
    assert mask is not None and int(mask.sum()) == out.prompt_token_ids.count(VIDEO_TOKEN)
    ids, positions = rec.positions[-1]
    start = out.prompt_token_ids.index(VISION_START)
    check_video_positions(ids, positions, demo_units(10, 168, 224), mask, start)


def test_two_pruned_videos_in_one_prompt(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stock vLLM (EVS too) advances positions by the unpruned size and fails here."""
    rec = Recorder(live_model(llm), monkeypatch)
    videos = [
        video_item(moving_square_video(8, 112, 168, seed=3)),
        video_item(moving_square_video(6, 196, 140, seed=4)),
    ]
    (out,) = _generate(
        llm, [{"prompt": chat_prompt("video", "video"), "multi_modal_data": {"video": videos}}]
    )
    assert len(out.outputs[0].token_ids) > 0
    ids, positions = rec.positions[-1]
    first = out.prompt_token_ids.index(VISION_START)
    end = check_video_positions(ids, positions, demo_units(8, 112, 168), rec.masks[0], first)
    second = out.prompt_token_ids.index(VISION_START, end)
    check_video_positions(ids, positions, demo_units(6, 196, 140), rec.masks[1], second)


def test_long_video_positions_stay_exact(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """t positions beyond 256 (where bfloat16 stops being exact) arrive unchanged."""
    rec = Recorder(live_model(llm), monkeypatch)
    (out,) = _generate(llm, [_video_prompt(300, 56, 56, keep=0.5, seed=5)], max_tokens=2)
    ids, positions = rec.positions[-1]
    grid = demo_units(300, 56, 56)
    assert int(mrope_positions(*grid, 2.0)[0].max()) > 256
    check_video_positions(
        ids, positions, grid, rec.masks[0], out.prompt_token_ids.index(VISION_START)
    )


def test_mixed_batch(llm: Any) -> None:
    """Images, videos of different lengths and keep ratios, text-only: one generate()."""
    prompts = [
        {
            "prompt": chat_prompt("image", "video"),
            "multi_modal_data": {
                "image": [image(112, 140)],
                "video": [video_item(moving_square_video(6, 112, 112, seed=6))],
            },
        },
        _video_prompt(16, 140, 196, keep=0.5, seed=7),
        {"prompt": chat_prompt(question="Say something.")},
        _video_prompt(4, 84, 84, keep=1.0, seed=8),
        _video_prompt(20, 56, 84, keep=0.3, seed=9),
    ]
    outputs = _generate(llm, prompts)
    expected_video_tokens = [
        retained_count(3, 16, 0.5),
        retained_count(8, 35, 0.5),
        0,
        retained_count(2, 9, 1.0),
        retained_count(10, 6, 0.3),
    ]
    for out, expected in zip(outputs, expected_video_tokens, strict=True):
        assert out.prompt_token_ids.count(VIDEO_TOKEN) == expected
        assert len(out.outputs[0].token_ids) > 0
    assert outputs[0].prompt_token_ids.count(IMAGE_TOKEN) == 4 * 5


@pytest.mark.parametrize("keep", [0.0, 1.5, "half"])
def test_bad_request_keep_ratio_is_refused(llm: Any, keep: object) -> None:
    with pytest.raises(ValueError, match="stts_keep_ratio"):
        _generate(llm, [_video_prompt(4, 56, 56, keep=keep)])  # type: ignore[arg-type]


def test_cpu_runner_runs_in_pruning_mode(llm: Any) -> None:
    """The CPU runner patch: without it pruned positions are never recomputed on CPU."""
    flags = llm.collective_rpc(lambda worker: worker.model_runner.is_multimodal_pruning_enabled)
    assert flags == [True]


def test_same_video_at_two_keep_ratios(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches are keyed by keep ratio too: the same video at 0.5, 0.3, 0.5 gets its own count
    and mask each time, and 0.3 keeps a subset of what 0.5 keeps (same scores)."""
    rec = Recorder(live_model(llm), monkeypatch)
    prompts = [_video_prompt(12, 140, 196, keep=k, seed=15) for k in (0.5, 0.3, 0.5)]
    outputs = [_generate(llm, [p], max_tokens=2)[0] for p in prompts]
    t, h, w = demo_units(12, 140, 196)
    counts = [o.prompt_token_ids.count(VIDEO_TOKEN) for o in outputs]
    assert counts == [retained_count(t, h * w, k) for k in (0.5, 0.3, 0.5)]
    # the repeated 0.5 request may hit the encoder cache (no new mask): masks seen are 0.5, 0.3
    half, third = rec.masks[0], rec.masks[1]
    assert int(half.sum()) == counts[0] and int(third.sum()) == counts[1]
    assert bool((third <= half).all())


def test_stray_placeholder_token_fails_the_request_not_the_engine(llm: Any) -> None:
    prompt = _video_prompt(4, 56, 56)
    prompt["prompt"] = prompt["prompt"].replace("What happens", "<|image_pad|> What happens")
    with pytest.raises(ValueError, match="placeholder token"):
        _generate(llm, [prompt])
    assert len(_generate(llm, [_video_prompt(4, 56, 56)])[0].outputs[0].token_ids) > 0


def test_video_beyond_the_position_range_is_refused(llm: Any) -> None:
    """A tiny fps stretches M-RoPE time positions; refused in the processor, engine lives."""
    frames = moving_square_video(8, 56, 56, seed=16)
    prompt = {
        "prompt": chat_prompt("video"),
        "multi_modal_data": {"video": [video_item(frames, fps=1e-4)]},
    }
    with pytest.raises(ValueError, match="time positions"):
        _generate(llm, [prompt])
    assert len(_generate(llm, [_video_prompt(4, 56, 56)])[0].outputs[0].token_ids) > 0


def test_prefix_cache_hit_inside_a_pruned_video(llm: Any) -> None:
    """A second question about the same video reuses the cached prefix, which ends inside
    the video's tokens; the answer must equal the one computed without any cache."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    video = [video_item(moving_square_video(16, 196, 196, seed=17))]

    def ask(question: str) -> Any:
        prompt = {
            "prompt": chat_prompt("video", question=question),
            "multi_modal_data": {"video": video},
        }
        return llm.generate([prompt], params, use_tqdm=False)[0]

    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    llm.reset_prefix_cache()
    cold = ask("Which way does it move?")
    ask("Is there a square?")  # fills the cache with the shared prefix
    warm = ask("Which way does it move?")
    ids = warm.prompt_token_ids
    first_video, video_end = ids.index(VIDEO_TOKEN), ids.index(1004)  # <|vision_end|>
    assert first_video < (warm.num_cached_tokens or 0) < video_end  # the hit ends mid-video
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
    for a, b in zip(warm.outputs[0].logprobs, cold.outputs[0].logprobs, strict=True):
        assert {t: round(v.logprob, 4) for t, v in a.items()} == {
            t: round(v.logprob, 4) for t, v in b.items()
        }
