"""How many unpruned patches one call of the pruned tower may take (the patch budget), and
whether its calls are timed.

vLLM's scheduler admits media into a step by their *placeholder* tokens, which for a pruned
video are the kept tokens only; but the tower's memory peaks in the blocks before the pruning
point, where every patch is still there. vLLM 0.32 guards against that by encoding pruned
videos one at a time (`_execute_mm_encoder`). STTS instead encodes the videos of a step
together, in as few calls as fit this budget (`core.packing.budget_batches`).

The default is what the engine profiled at start-up: `profile_run` encodes
`mm_max_items_per_batch` items of the largest modality at their maximum size in one call, and
start-up reserves memory for that peak, so a call of at most that many patches is covered.
`STTS_ENCODER_PATCH_BUDGET` overrides it (lower: smaller peaks and more calls; higher: the
engine did not reserve memory for it). The engine's own encoder budget
(`max_num_encoder_input_tokens`, an engine argument) moves the profile, and so the default,
with it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

PATCH_BUDGET_ENV = "STTS_ENCODER_PATCH_BUDGET"
TIMING_ENV = "STTS_ENCODER_TIMING"


def timed_encoder(device: Any) -> bool:
    """Whether pruned-tower calls on `device` are timed (`stts_model.EncoderCalls`): always
    on the CPU, where it is free; on a GPU only with `STTS_ENCODER_TIMING=1`, since it needs a
    device sync after each call."""
    return device.type == "cpu" or os.environ.get(TIMING_ENV, "") == "1"


def profiled_patch_budget(vllm_config: Any, merge: int) -> int | None:
    """Patches in the encoder call `profile_run` makes (tokens x merge²); None when the
    engine has no multimodal encoder budget (nothing was profiled)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget

    budget = MultiModalBudget(vllm_config, MULTIMODAL_REGISTRY, enable_cache=False)
    if budget.get_encoder_budget() <= 0 or not budget.mm_max_toks_per_item:
        return None
    modality = budget.get_modality_with_max_tokens()
    tokens = budget.mm_max_items_per_batch[modality] * budget.mm_max_toks_per_item[modality]
    return tokens * merge * merge


def encoder_patch_budget(vllm_config: Any, merge: int) -> int | None:
    """The setting if given (`STTS_ENCODER_PATCH_BUDGET`, a positive integer), else the
    profiled call's patches."""
    profiled = profiled_patch_budget(vllm_config, merge)
    raw = os.environ.get(PATCH_BUDGET_ENV, "").strip()
    if not raw:
        return profiled
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{PATCH_BUDGET_ENV} must be a positive integer (patches), got {raw!r}")
    if profiled is not None and value > profiled:
        logger.warning(
            "%s=%d is above the %d patches the engine profiled at start-up: encoder calls "
            "may need more memory than was reserved",
            PATCH_BUDGET_ENV,
            value,
            profiled,
        )
    return value
