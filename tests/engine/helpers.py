"""What the engine test modules share: engine settings, the live model, spies on its code
paths, the demo's token ids, and the checks and tolerances of the dense references."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
import torch

from stts_vllm.core import mrope_positions

# `make gpu-check` runs this suite on a CUDA machine in bfloat16 too (and with the V2 model
# runner, CUDA graphs): tests marked `float32_exact` compare against float32 references and
# are skipped in other dtypes.
TEST_DTYPE = os.environ.get("STTS_TEST_DTYPE", "float32")
ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": TEST_DTYPE,
    "enforce_eager": os.environ.get("STTS_TEST_ENFORCE_EAGER", "1") == "1",
    "max_model_len": 8192,
    "limit_mm_per_prompt": {"image": 2, "video": 3},
    "seed": 0,
}
# The demo tokenizer's ids (Qwen2.5-VL and Qwen3-VL demos share the tokenizer).
VIDEO_TOKEN, IMAGE_TOKEN, VISION_START = 1007, 1006, 1003


def live_model(llm: Any) -> Any:
    """The engine's own model object (same process)."""
    return llm.apply_model(lambda model: model)[0]


def greedy_with_logprobs(llm: Any, prompts: list[dict[str, Any]]) -> list[tuple[list, list]]:
    """12 greedy tokens per prompt and the top-3 logprobs of each step."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3)
    return [
        (
            list(o.outputs[0].token_ids),
            [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
        )
        for o in llm.generate(prompts, params, use_tqdm=False)
    ]


class Recorder:
    """Spies on the real code paths of a live STTS model (they still run): the keep masks
    its vision tower chose and the M-RoPE positions the runner ends up with."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.masks: list[torch.Tensor | None] = []
        self.positions: list[tuple[torch.Tensor, torch.Tensor]] = []
        forward, recompute = model._pruned_vision_forward, model.recompute_mrope_positions

        def recording_forward(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            self.masks.extend(out.keep_masks)
            return out

        def recording_recompute(input_ids: Any, *args: Any, **kwargs: Any) -> Any:
            out = recompute(input_ids, *args, **kwargs)
            self.positions.append((torch.as_tensor(input_ids).cpu(), out[1].cpu().clone()))
            return out

        monkeypatch.setattr(model, "_pruned_vision_forward", recording_forward)
        monkeypatch.setattr(model, "recompute_mrope_positions", recording_recompute)


def demo_units(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Grid in units as the demo processor sizes it (multiples of 28 px; 2 frames a step)."""
    return (frames + 1) // 2, height // 28, width // 28


def check_video_positions(
    ids: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int, int],
    mask: torch.Tensor,
    start: int,
    t_factor: float = 2.0,
) -> int:
    """Positions of the video starting at token `start` are exactly its kept units' original
    (t, h, w); returns the index after its placeholder run."""
    assert int(ids[start]) == VISION_START
    base = int(positions[0, start]) + 1
    first = start + 1
    count = int(mask.sum())
    assert (
        ids[first : first + count].eq(VIDEO_TOKEN).all() and int(ids[first + count]) != VIDEO_TOKEN
    )
    full = mrope_positions(*grid, t_factor)
    assert torch.equal(positions[:, first : first + count] - base, full[:, mask])
    # text after the video resumes where the unpruned video would have ended
    assert (positions[:, first + count] == base + int(full.max()) + 1).all()
    return first + count


MASKED = -1e9  # finite: a fully masked (pruned) query row stays finite
ATOL = 1e-4  # float32 reordering noise here is ~3e-5 on outputs of magnitude ~5
RELATIVE_NOISE = 2e-5  # ATOL at magnitude 5; float32 noise measured at <= 1e-5 of max |output|


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 reordering noise grows with the output's scale (Qwen3-VL towers with deepstack
    reach ~20 where Qwen2.5-VL's reach ~5): the tolerance follows max |ref|, never below ATOL.
    A wrong mask, position or bias moves outputs by far more (see the bias guard test)."""
    atol = max(ATOL, RELATIVE_NOISE * ref.abs().max().item())
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


def segment_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    ids = torch.zeros(length, dtype=torch.long, device=cu_seqlens.device)
    for i, (a, b) in enumerate(itertools.pairwise(cu_seqlens.tolist())):
        ids[a:b] = i
    return ids


def same_choice_up_to_ties(
    ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor, units_per_step: int
) -> bool:
    """Masks agree, except among units whose scores sit within float noise of the cut."""
    differ = (ours != theirs).nonzero().flatten()
    if differ.numel() == 0:
        return True
    rest = scores[units_per_step:]
    kept_rest = theirs[units_per_step:]
    cut = rest[kept_rest].min() if kept_rest.any() else rest.max()
    return bool(((scores[differ] - cut).abs() < 1e-5).all())
