"""Pruned videos encoded together through the real engine: the plugin's runner hook hands a
step's videos to the model in one call, the model runs them through the pruned tower in as
few calls as its patch budget allows, and every video comes out exactly as when encoded alone
(vLLM's stock path for pruning models: one call per video)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from media import chat_prompt, image, moving_square_video, video_item

from tests.engine.helpers import assert_close_to_reference, live_model

# (frames, height, width, keep ratio): different sizes and ratios, keep 1.0 among them
VIDEOS = [
    (8, 112, 168, 0.5),
    (6, 196, 140, 0.3),
    (10, 140, 196, 1.0),
    (4, 84, 112, 0.7),
    (12, 168, 112, 0.5),
    (6, 112, 112, 0.4),
]


def _prompts(videos: list[tuple[int, int, int, float]]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": chat_prompt("video"),
            "multi_modal_data": {"video": [video_item(moving_square_video(f, h, w, seed=i))]},
            "mm_processor_kwargs": {"stts_keep_ratio": keep},
        }
        for i, (f, h, w, keep) in enumerate(videos)
    ]


class Spy:
    """The model's video encoder outputs (embeddings + position columns, per video, in order)
    and the pruned tower's calls (patches, videos); both paths still run."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.outputs: list[torch.Tensor] = []
        self.calls: list[tuple[int, int]] = []
        self.handed: list[tuple[str, int]] = []  # per `embed_multimodal` call: modality, items
        embed, forward = model.embed_multimodal, model._pruned_vision_forward

        def spy_embed(**kwargs: Any) -> Any:
            out = embed(**kwargs)
            modality = "video" if kwargs.get("pixel_values_videos") is not None else "image"
            self.handed.append((modality, len(out)))
            if kwargs.get("pixel_values_videos") is not None:
                self.outputs.extend(o.detach().float().cpu().clone() for o in out)
            return out

        def spy_forward(visual: Any, pixels: torch.Tensor, grids: Any, *args: Any, **kw: Any):
            self.calls.append((int(pixels.shape[0]), len(grids)))
            return forward(visual, pixels, grids, *args, **kw)

        monkeypatch.setattr(model, "embed_multimodal", spy_embed)
        monkeypatch.setattr(model, "_pruned_vision_forward", spy_forward)


def _run(llm: Any, prompts: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Greedy tokens and what the spy saw, from cold caches (no prefix or encoder reuse)."""
    from vllm import SamplingParams

    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()
    with monkeypatch.context() as patch:
        spy = Spy(live_model(llm), patch)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], spy


def _assert_same_videos(ours: list[torch.Tensor], alone: list[torch.Tensor]) -> None:
    assert len(ours) == len(alone)
    for got, expected in zip(ours, alone, strict=True):
        assert got.shape == expected.shape
        # the position columns exactly, the embeddings within float reordering noise
        assert torch.equal(got[:, -3:], expected[:, -3:])
        assert_close_to_reference(got, expected)


@pytest.mark.parametrize("ckpt_name", ["demo_ckpt", "qwen3_ckpt"])
@pytest.mark.parametrize("count", [2, 6])
def test_videos_encoded_together_equal_each_alone(
    engines, ckpt_name: str, count: int, request: pytest.FixtureRequest, monkeypatch
) -> None:
    llm = engines.get(request.getfixturevalue(ckpt_name))
    model = live_model(llm)
    prompts = _prompts(VIDEOS[:count])

    with monkeypatch.context() as stock:  # vLLM's own path for pruning models
        stock.setattr(model, "stts_batches_videos", False)
        alone_tokens, alone = _run(llm, prompts, monkeypatch)
    tokens, together = _run(llm, prompts, monkeypatch)

    pruned = sum(1 for *_, keep in VIDEOS[:count] if keep < 1)
    assert [videos for _, videos in alone.calls] == [1] * len(alone.calls)
    # alone, a keep 1.0 video takes the stock tower; together it rides along unpruned
    assert len(alone.outputs) == count and len(alone.calls) == pruned
    assert len(together.calls) < len(alone.calls)  # videos shared calls
    assert max(videos for _, videos in together.calls) > 1
    _assert_same_videos(together.outputs, alone.outputs)
    assert tokens == alone_tokens


def test_images_and_keep_one_videos_take_the_stock_path(
    engines, demo_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step without a pruned video: handed over together as for any unpruned model (one
    call per modality), through the stock tower; the pruned tower never runs."""
    llm = engines.get(demo_ckpt)
    model = live_model(llm)
    keep_one = [(f, h, w, 1.0) for f, h, w, _ in VIDEOS[:3]]
    pictures = [
        {"prompt": chat_prompt("image"), "multi_modal_data": {"image": [image(112 + 28 * i, 140)]}}
        for i in range(3)
    ]
    monkeypatch.setattr(model, "stts_encoder_calls", type(model.stts_encoder_calls)())
    # about 600 tokens in all: one scheduled step (the engine's batch holds thousands)
    prompts = _prompts(keep_one) + pictures
    assert llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens >= 2048
    _, spy = _run(llm, prompts, monkeypatch)
    assert spy.calls == [] and model.stts_encoder_calls.calls == 0
    assert sorted(spy.handed) == [("image", 3), ("video", 3)]


def test_a_batch_over_the_patch_budget_is_split(engines, demo_ckpt: Path, monkeypatch) -> None:
    llm = engines.get(demo_ckpt)
    model = live_model(llm)
    prompts = _prompts(VIDEOS)
    _, whole = _run(llm, prompts, monkeypatch)
    budget = max(patches for patches, _ in whole.calls) // 2
    monkeypatch.setattr(model, "stts_patch_budget", budget)
    _, split = _run(llm, prompts, monkeypatch)
    assert len(split.calls) > len(whole.calls)
    assert all(patches <= budget for patches, videos in split.calls if videos > 1)
    _assert_same_videos(split.outputs, whole.outputs)


def test_the_patch_budget_is_the_call_the_engine_profiled(
    engines, demo_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up reserves memory for `profile_run`'s encoder call (on a GPU, and on the CPU
    when it compiles): the runner's own dummy batch of the largest items. The budget is
    exactly its patches, and that call goes through the pruned tower in one piece (the dummy
    videos carry the checkpoint's ratio), so the largest call the budget allows was profiled."""
    llm = engines.get(demo_ckpt)
    model = live_model(llm)
    merge = model.config.vision_config.spatial_merge_size

    def profile_encoder(worker: Any) -> tuple[str, int, int, int]:
        runner = worker.model_runner
        budget = runner.mm_budget
        modality = budget.get_modality_with_max_tokens()
        items = budget.mm_max_items_per_batch[modality]
        batch = runner._get_mm_dummy_batch(modality, items)  # what profile_run encodes
        with torch.inference_mode():
            outputs = runner.model.embed_multimodal(**batch)
        return modality, items, budget.mm_max_toks_per_item[modality], len(outputs)

    monkeypatch.setattr(model, "stts_encoder_calls", type(model.stts_encoder_calls)())
    ((modality, items, tokens, encoded),) = llm.collective_rpc(profile_encoder)
    assert modality == "video" and encoded == items > 1
    assert model.stts_patch_budget == items * tokens * merge * merge
    calls = model.stts_encoder_calls
    assert (calls.calls, calls.videos) == (1, items)
    assert calls.largest_patches == model.stts_patch_budget
