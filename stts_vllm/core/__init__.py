"""The STTS method in plain PyTorch: no vLLM import, so training, serving and tests share it.

Read in this order: `config` (the knobs), `scoring` (what a token's score is and how it is
learned), `selection` (which units survive), `packing` (where survivors go in the ViT's
variable-length sequences), `mrope` (where they go in the LLM's M-RoPE positions, and the
walk over a prompt), `attention` (the biased block), `driver` (the pruned forward pass of any
tower, through a small adapter).
"""

from stts_vllm.core.attention import BIAS_CHANNELS, varlen_attention, with_key_bias_channel
from stts_vllm.core.config import STTSConfig
from stts_vllm.core.mrope import (
    grid_placement,
    mrope_positions,
    mrope_time_factor,
    prompt_mrope_positions,
    step_positions,
    timestamped_video_positions,
)
from stts_vllm.core.packing import (
    PackedUnits,
    budget_batches,
    pack_kept_units,
    token_rows,
    window_partition,
)
from stts_vllm.core.scoring import (
    STTSScorer,
    heuristic_scores,
    key_bias,
    random_scores,
    score_units,
    temporal_loss,
    temporal_target,
)
from stts_vllm.core.selection import (
    retained_count,
    retention_mask,
    sample_retention,
    step_quotas,
)

__all__ = [
    "BIAS_CHANNELS",
    "PackedUnits",
    "STTSConfig",
    "STTSScorer",
    "budget_batches",
    "grid_placement",
    "heuristic_scores",
    "key_bias",
    "mrope_positions",
    "mrope_time_factor",
    "pack_kept_units",
    "prompt_mrope_positions",
    "random_scores",
    "retained_count",
    "retention_mask",
    "sample_retention",
    "score_units",
    "step_positions",
    "step_quotas",
    "temporal_loss",
    "temporal_target",
    "timestamped_video_positions",
    "token_rows",
    "varlen_attention",
    "window_partition",
    "with_key_bias_channel",
]
