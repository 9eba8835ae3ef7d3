"""STTS Qwen2.5-VL for vLLM: the stock model, except that videos are pruned inside the ViT.

Read top to bottom: the `stts` config of a checkpoint, the video input schema, the processor
(placeholder count = the shared `retained_count`, per-request keep ratio), the model class
(pruned vision forward, kept units' M-RoPE positions through vLLM's pruning hooks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import (
    MultiModalFeatureSpec,
    MultiModalKwargsItems,
)
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from stts_vllm.core import (
    STTSConfig,
    grid_placement,
    mrope_positions,
    mrope_time_factor,
    prompt_mrope_positions,
    retained_count,
)
from stts_vllm.families import family_named
from stts_vllm.positions import POSITION_LIMIT
from stts_vllm.stts_model import STTSModelMixin, STTSProcessingInfoMixin, STTSProcessorMixin
from stts_vllm.stts_model import stts_config_of as _stts_config_of

FAMILY = family_named("qwen2_5_vl")


def stts_config_of(hf_config: Any) -> STTSConfig:
    """The checkpoint's validated `stts` block (errors name the field)."""
    return _stts_config_of(hf_config, FAMILY)


# === Processing === #


class STTSQwen2_5_VLProcessingInfo(STTSProcessingInfoMixin, Qwen2_5_VLProcessingInfo):
    stts_family = FAMILY


class STTSQwen2_5_VLMultiModalProcessor(STTSProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    info: STTSQwen2_5_VLProcessingInfo

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        keep_ratio, hf_kwargs = self.split_keep_ratio(hf_kwargs)
        outputs = super()._call_hf_processor(hf_data, hf_kwargs)
        if "video_grid_thw" in outputs:
            self._check_position_range(outputs)
            self.attach_keep_ratio(outputs, keep_ratio)
        return outputs

    def _check_position_range(self, outputs: BatchFeature) -> None:
        """A video's M-RoPE time positions must fit the LLM's rotary table and the position
        carrier; a tiny fps in the metadata stretches them (`t = step x seconds x rate`)."""
        config = self.info.get_hf_config()
        text = getattr(config, "text_config", config)
        limit = min(POSITION_LIMIT, int(getattr(text, "max_position_embeddings", POSITION_LIMIT)))
        seconds = outputs.get("second_per_grid_ts")
        tokens_per_second = config.vision_config.tokens_per_second
        for i, (t, _, _) in enumerate(outputs["video_grid_thw"].tolist()):
            step = float(seconds[i]) if seconds is not None else 1.0
            if (t - 1) * step * tokens_per_second >= limit:
                raise ValueError(
                    f"video {i} spans more time positions than the model supports ({limit}); "
                    "check its fps metadata"
                )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        """The stock updates, with the video placeholder sized by `retained_count`."""
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def video_tokens(item_idx: int, token: int) -> list[int]:
            item = out_mm_kwargs["video"][item_idx]
            t, h, w = (int(x) for x in item["video_grid_thw"].data)
            keep_ratio = self.item_keep_ratio(item)
            return [token] * retained_count(t, (h // merge) * (w // merge), keep_ratio)

        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        for i, update in enumerate(updates):
            if update.modality == "video":
                (token,) = update.target
                updates[i] = PromptReplacement(
                    modality="video",
                    target=update.target,
                    replacement=lambda item_idx, token=token: video_tokens(item_idx, token),
                )
        return updates


# === Model === #


@MULTIMODAL_REGISTRY.register_processor(
    STTSQwen2_5_VLMultiModalProcessor,
    info=STTSQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class STTSQwen2_5_VLForConditionalGeneration(STTSModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose vision tower drops low-scoring video units after block `prune_at`;
    kept units keep their original (t, h, w) M-RoPE positions."""

    stts_family = FAMILY

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_stts(vllm_config)

    # -- positions: kept units keep their original (t, h, w) --

    def media_positions(
        self, modality: str, grid_thw: Sequence[int], inputs: Any, index: int
    ) -> torch.Tensor:
        """(t, h, w) of every unit; a video's t advances by its seconds per step."""
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in grid_thw)
        t_factor = 1.0
        if modality == "video":
            seconds = inputs.get("second_per_grid_ts")
            second = 1.0 if seconds is None else float(seconds[index])
            t_factor = mrope_time_factor(second, self.config.vision_config.tokens_per_second)
        return mrope_positions(t, h // merge, w // merge, t_factor)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """Stock positions, except that each media item advances the prompt by its real
        (possibly pruned) placeholder length: the stock code assumes t*h*w and breaks on a
        prompt with two pruned videos. Pruned items' own columns are placeholders that
        `recompute_mrope_positions` overwrites once the encoder has chosen the kept units."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = [(f.mm_position.offset, f.mm_position.length) for f in features]
        grids = [
            mrope_positions(t, h, w, t_factor)
            for _, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features)
        ]
        return prompt_mrope_positions(
            len(input_tokens),
            media,
            lambda i, start: grid_placement(grids[i], start, slice(media[i][1])),
        )
