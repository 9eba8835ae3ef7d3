"""STTS Qwen3-VL (dense, MoE) and Qwen3.5 for vLLM: the stock models, except that videos are
pruned inside the ViT.

Qwen3-VL's prompt names every temporal step: `<t seconds><|vision_start|>` + that step's
video tokens + `<|vision_end|>`. Token counts must be fixed before the ViT runs, so each step
keeps a quota (`per_step` selection: the first step whole, the rest an equal share, ranked
within the step), and every kept token stays under its own step's timestamp. (vLLM's EVS puts
all kept tokens under the first timestamp instead, vLLM #30847.) Inside a step the LLM
positions are the stock ones, `(0, y, x)` after the step's vision start; kept units keep
theirs, and text resumes where the unpruned step would have ended. Deepstack features are
pruned with the main output by the driver (`stts_vllm.core.driver`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from stts_vllm.core import (
    grid_placement,
    prompt_mrope_positions,
    step_positions,
    step_quotas,
    timestamped_video_positions,
)
from stts_vllm.core.mrope import Placement
from stts_vllm.families import family_named
from stts_vllm.stts_model import STTSModelMixin, STTSProcessingInfoMixin, STTSProcessorMixin

# === Processing === #


class _StockCountsContext(InputProcessingContext):
    """The processing context the stock Qwen3-VL processor sees: vLLM's pruning mode off.

    With the mode on (the plugin turns it on, so the runner re-places kept tokens), the
    stock processor lumps every token under the first timestamp. STTS knows each step's
    count, so the stock code sizes every step fully and `STTSQwen3VLMultiModalProcessor`
    shrinks each step to its quota."""

    @cached_property
    def _mm_config_without_pruning(self) -> Any:
        unpruned = copy.copy(self.model_config.multimodal_config)
        object.__setattr__(unpruned, "video_pruning_rate", None)  # no re-validation
        return unpruned

    def get_mm_config(self) -> Any:
        return self._mm_config_without_pruning


class _STTSQwen3ProcessingInfoMixin(STTSProcessingInfoMixin):
    def __init__(self, ctx: InputProcessingContext) -> None:
        super().__init__(
            _StockCountsContext(model_config=ctx.model_config, tokenizer=ctx.tokenizer)
        )

    def video_step_quotas(self, grid_thw: Sequence[int], keep_ratio: float) -> list[int]:
        merge = self.get_hf_config().vision_config.spatial_merge_size  # type: ignore[attr-defined]
        t, h, w = (int(x) for x in grid_thw)
        return step_quotas(t, (h // merge) * (w // merge), keep_ratio)


class STTSQwen3VLProcessingInfo(_STTSQwen3ProcessingInfoMixin, Qwen3VLProcessingInfo):
    stts_family = family_named("qwen3_vl")


class STTSQwen3VLMoeProcessingInfo(_STTSQwen3ProcessingInfoMixin, Qwen3VLMoeProcessingInfo):
    stts_family = family_named("qwen3_vl_moe")


class STTSQwen3_5ProcessingInfo(_STTSQwen3ProcessingInfoMixin, Qwen3_5ProcessingInfo):
    stts_family = family_named("qwen3_5")


def _shrink_video_runs(ids: list[int], video_token: int, quotas: list[int]) -> list[int]:
    """Cut the i-th run of video tokens in `ids` to `quotas[i]` tokens (one run per step)."""
    out: list[int] = []
    run = 0
    i = 0
    while i < len(ids):
        if ids[i] != video_token:
            out.append(ids[i])
            i += 1
            continue
        end = i
        while end < len(ids) and ids[end] == video_token:
            end += 1
        if run >= len(quotas) or quotas[run] > end - i:
            raise ValueError("video placeholder runs do not match the videos' temporal steps")
        out.extend([video_token] * quotas[run])
        run += 1
        i = end
    if run != len(quotas):
        raise ValueError("video placeholder runs do not match the videos' temporal steps")
    return out


class STTSQwen3VLMultiModalProcessor(STTSProcessorMixin, Qwen3VLMultiModalProcessor):
    info: _STTSQwen3ProcessingInfoMixin  # type: ignore[assignment]

    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        keep_ratio, hf_kwargs = self.split_keep_ratio(hf_kwargs)
        outputs = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if "video_grid_thw" not in outputs:
            return outputs
        self.attach_keep_ratio(outputs, keep_ratio)
        if "input_ids" in outputs:  # the stock processor expanded the prompt: fit the quotas
            grids = outputs["video_grid_thw"].tolist()
            quotas = [q for g in grids for q in self.info.video_step_quotas(g, keep_ratio)]
            video_token = self.info.get_hf_config().video_token_id
            ids = outputs["input_ids"]
            rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            shrunk = [_shrink_video_runs(list(row), video_token, quotas) for row in rows]
            outputs["input_ids"] = torch.tensor(shrunk) if isinstance(ids, torch.Tensor) else shrunk
        return outputs

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: Any,
    ) -> Sequence[PromptUpdate]:
        """The stock updates, with each step's video tokens cut to its quota; only video
        tokens take embeddings (timestamps and delimiters stay text)."""
        config = self.info.get_hf_config()
        tokenizer = self.info.get_tokenizer()

        def video_replacement(item_idx: int) -> Any:
            item = out_mm_kwargs["video"][item_idx]
            keep_ratio = self.item_keep_ratio(item)
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=self.info.video_step_quotas(
                    item["video_grid_thw"].data, keep_ratio
                ),
                timestamps=item["timestamps"].data,
                tokenizer=tokenizer,
                vision_start_token_id=config.vision_start_token_id,
                vision_end_token_id=config.vision_end_token_id,
                video_token_id=config.video_token_id,
                select_token_id=True,
            )

        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        return [
            PromptReplacement(modality="video", target=u.target, replacement=video_replacement)
            if u.modality == "video"
            else u
            for u in updates
        ]


# === Model === #


class _STTSQwen3VLMixin(STTSModelMixin):
    """The STTS parts of the Qwen3-VL model classes: positions of kept units per step."""

    config: Any

    def _unit_grid(self, grid_thw: Sequence[int]) -> tuple[int, int, int]:
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in grid_thw)
        return t, h // merge, w // merge

    def media_positions(
        self, modality: str, grid_thw: Sequence[int], inputs: Any, index: int
    ) -> torch.Tensor:
        """`(0, y, x)` of every unit of each step: time is in the prompt's timestamps."""
        t, h, w = self._unit_grid(grid_thw)
        return step_positions(h, w).repeat(1, t)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """The stock positions for any per-step token counts: text advances one by one; a
        step's (or an image's) tokens sit at `(0, y, x)` after its start; text after a step
        resumes where the unpruned step ends (`start + max(H, W)`), however many tokens it
        kept. Pruned steps' columns are placeholders that `recompute_mrope_positions`
        overwrites once the encoder has chosen the kept units."""
        cfg = self.config
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = [(f.mm_position.offset, f.mm_position.length) for f in features]

        def place(i: int, start: int) -> Placement:
            feature, (offset, length) = features[i], media[i]
            grid_key = "image_grid_thw" if feature.modality == "image" else "video_grid_thw"
            _, h, w = self._unit_grid(feature.data[grid_key].data.tolist())
            if feature.modality == "image":
                return grid_placement(step_positions(h, w), start, slice(length))
            return timestamped_video_positions(
                input_tokens[offset : offset + length],
                h,
                w,
                start,
                video_token=cfg.video_token_id,
                vision_start=cfg.vision_start_token_id,
                vision_end=cfg.vision_end_token_id,
            )

        return prompt_mrope_positions(len(input_tokens), media, place)


def _register(info: type) -> Any:
    return MULTIMODAL_REGISTRY.register_processor(
        STTSQwen3VLMultiModalProcessor, info=info, dummy_inputs=Qwen3VLDummyInputsBuilder
    )


@_register(STTSQwen3VLProcessingInfo)
class STTSQwen3VLForConditionalGeneration(_STTSQwen3VLMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose vision tower drops low-scoring video units after block `prune_at`."""

    stts_family = family_named("qwen3_vl")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_stts(vllm_config)


@_register(STTSQwen3VLMoeProcessingInfo)
class STTSQwen3VLMoeForConditionalGeneration(_STTSQwen3VLMixin, Qwen3VLMoeForConditionalGeneration):
    stts_family = family_named("qwen3_vl_moe")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_stts(vllm_config)


@_register(STTSQwen3_5ProcessingInfo)
class STTSQwen3_5ForConditionalGeneration(_STTSQwen3VLMixin, Qwen3_5ForConditionalGeneration):
    stts_family = family_named("qwen3_5")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_stts(vllm_config)
