"""The STTS method in plain PyTorch: no vLLM import, so training, serving and tests share it.

Read in this order: `config` (the knobs), `scoring` (what a token's score is and how it is
learned), `selection` (which units survive), `packing` (where survivors go in the ViT's
variable-length sequences and in the LLM's M-RoPE grid), `attention` (the biased block).
"""

from stts_vllm.core.attention import varlen_attention
from stts_vllm.core.config import STTSConfig
from stts_vllm.core.packing import (
    PackedUnits,
    mrope_positions,
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
from stts_vllm.core.selection import retained_count, retention_mask

__all__ = [
    "PackedUnits",
    "STTSConfig",
    "STTSScorer",
    "heuristic_scores",
    "key_bias",
    "mrope_positions",
    "pack_kept_units",
    "random_scores",
    "retained_count",
    "retention_mask",
    "score_units",
    "temporal_loss",
    "temporal_target",
    "token_rows",
    "varlen_attention",
    "window_partition",
]
