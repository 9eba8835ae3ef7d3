"""STTS Qwen2.5-VL for vLLM: the stock model, except that videos are pruned inside the ViT.

Read top to bottom: the `stts` config of a checkpoint, the video input schema, the processor
(placeholder count = the shared `retained_count`, per-request keep ratio), the model class
(pruned vision forward, kept units' M-RoPE positions through vLLM's pruning hooks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    Qwen2_5_VLVideoInputs,
    Qwen2_5_VLVideoPixelInputs,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import (
    MultiModalFeatureSpec,
    MultiModalFieldConfig,
    MultiModalKwargsItems,
)
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.utils.tensor_schema import TensorShape

from stts_vllm.core import STTSConfig, STTSScorer, mrope_positions, retained_count
from stts_vllm.core.config import STTSConfigError, check_keep_ratio
from stts_vllm.plugin import STTS_ARCHITECTURE
from stts_vllm.positions import (
    POSITION_COLUMNS,
    POSITION_LIMIT,
    decode_positions,
    encode_positions,
    place_media_positions,
)
from stts_vllm.pruned_vision import install_key_bias, pruned_vision_forward

logger = init_logger(__name__)

KEEP_RATIO_KWARG = "stts_keep_ratio"
"""Per-request keep ratio: `mm_processor_kwargs={"stts_keep_ratio": r}`."""


def stts_config_of(hf_config: Any) -> STTSConfig:
    """The checkpoint's validated `stts` block (errors name the field)."""
    raw = getattr(hf_config, "stts", None)
    if raw is None:
        raise STTSConfigError(
            f"config.json of an {STTS_ARCHITECTURE} checkpoint needs an `stts` block "
            "(make one with `stts-vllm convert`)"
        )
    config = STTSConfig.from_dict(dict(raw))
    config.check_vit_depth(hf_config.vision_config.depth)
    return config


# === Inputs === #


class STTSVideoPixelInputs(Qwen2_5_VLVideoPixelInputs):
    """The stock video pixels plus each item's keep ratio.

    Dimensions:
        - nv: Number of videos
    """

    stts_keep_ratio: Annotated[torch.Tensor, TensorShape("nv")]


# === Processing === #


class STTSQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_stts_config(self) -> STTSConfig:
        return stts_config_of(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(KEEP_RATIO_KWARG, None)  # ours, not the HF processor's
        return super().get_hf_processor(**kwargs)

    def resolve_keep_ratio(self, requested: object) -> float:
        if requested is None:
            return self.get_stts_config().keep_ratio
        return check_keep_ratio(requested, KEEP_RATIO_KWARG)


class STTSQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    info: STTSQwen2_5_VLProcessingInfo

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        self._check_placeholder_tokens(inputs)
        return super().apply(inputs, timing_ctx)

    def _check_placeholder_tokens(self, inputs: Any) -> None:
        """One placeholder token per media item, none elsewhere: kept tokens are placed by
        finding their placeholder runs in the prompt, so a stray pad token (a literal
        `<|image_pad|>` typed in text) would misplace them. Checked before any cache is
        touched, so refusing the request leaves the processor caches consistent."""
        config = self.info.get_hf_config()
        counts = inputs.mm_data_items.get_all_counts()
        for modality, token in (("image", config.image_token_id), ("video", config.video_token_id)):
            found = sum(1 for t in inputs.prompt if t == token)
            if found != counts.get(modality, 0):
                raise ValueError(
                    f"prompt has {found} {modality} placeholder token(s) for "
                    f"{counts.get(modality, 0)} {modality} item(s): one each, none in the text"
                )

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # The request's value, else the server's --mm-processor-kwargs, else the checkpoint's.
        merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)
        keep_ratio = self.info.resolve_keep_ratio(merged.get(KEEP_RATIO_KWARG))
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != KEEP_RATIO_KWARG}
        outputs = super()._call_hf_processor(hf_data, hf_kwargs)
        if "video_grid_thw" in outputs:
            self._check_position_range(outputs)
            num_videos = len(outputs["video_grid_thw"])
            outputs[KEEP_RATIO_KWARG] = torch.full((num_videos,), keep_ratio)
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

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return dict(
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            **{KEEP_RATIO_KWARG: MultiModalFieldConfig.batched("video", keep_on_cpu=True)},
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
            # Precomputed video embeddings bypass the HF processor: nothing to prune there.
            keep = item.get(KEEP_RATIO_KWARG)
            keep_ratio = 1.0 if keep is None else float(keep.data)
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
class STTSQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose vision tower drops low-scoring video units after block `prune_at`.

    Always runs in vLLM's multimodal pruning mode (the plugin's config hook turns it on), so
    each media item's embeddings carry their M-RoPE positions and the runner re-places the
    kept tokens at their original (t, h, w).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.stts_config = stts_config_of(self.config)
        self.stts_scorer: STTSScorer | None = None
        if self.visual is not None:
            install_key_bias(self.visual, self.stts_config.prune_at + 1)
        if self.stts_config.scorer == "learned":
            with self._mark_tower_model(vllm_config, "video"):
                self.stts_scorer = STTSScorer(
                    self.config.vision_config.hidden_size, self.stts_config.scorer_hidden_size
                )

    # -- video encoding --

    def _parse_and_validate_video_input(self, **kwargs: object) -> Qwen2_5_VLVideoInputs | None:
        video_input = super()._parse_and_validate_video_input(**kwargs)
        if video_input is None or video_input["type"] != "pixel_values_videos":
            return video_input
        keep_ratio = kwargs.get(KEEP_RATIO_KWARG)
        if keep_ratio is None:
            num_videos = len(video_input["video_grid_thw"])
            keep_ratio = torch.full((num_videos,), self.stts_config.keep_ratio)
        return STTSVideoPixelInputs(
            type="pixel_values_videos",
            pixel_values_videos=video_input["pixel_values_videos"],
            video_grid_thw=video_input["video_grid_thw"],
            second_per_grid_ts=video_input["second_per_grid_ts"],
            stts_keep_ratio=keep_ratio,
        )

    def _process_video_input(self, video_input: Qwen2_5_VLVideoInputs) -> tuple[torch.Tensor, ...]:
        if not isinstance(video_input, STTSVideoPixelInputs):
            return super()._process_video_input(video_input)  # precomputed embeddings
        keep_ratios = [float(k) for k in video_input["stts_keep_ratio"].reshape(-1)]
        if all(k >= 1.0 for k in keep_ratios):
            return super()._process_video_input(video_input)
        # One video at a time: the early blocks see every patch, and the scheduler's encoder
        # budget counts pruned tokens, so batching all scheduled videos could exceed the
        # memory profiled for one unpruned video.
        grids = video_input["video_grid_thw"].tolist()
        pixels = video_input["pixel_values_videos"].split([t * h * w for t, h, w in grids])
        embeds, masks = [], []
        for item_pixels, grid, keep in zip(pixels, grids, keep_ratios, strict=True):
            pruned = pruned_vision_forward(
                self.visual,
                item_pixels,
                [grid],
                [keep],
                config=self.stts_config,
                scorer=self.stts_scorer,
            )
            embeds.extend(pruned.embeds)
            masks.extend(pruned.keep_masks)
        # Carried with this call's data (not on self) to the position step below.
        video_input.stts_keep_masks = masks  # type: ignore[attr-defined]
        return tuple(embeds)

    # -- positions: kept units keep their original (t, h, w) --

    def _media_positions(self, grid_thw: Sequence[int], t_factor: float) -> torch.Tensor:
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in grid_thw)
        return mrope_positions(t, h // merge, w // merge, t_factor)

    def _postprocess_image_embeds_evs(
        self, image_embeds_split: tuple[torch.Tensor, ...], image_input: Any
    ) -> tuple[torch.Tensor, ...]:
        grids = image_input["image_grid_thw"].tolist()
        return tuple(
            torch.cat([emb, encode_positions(self._media_positions(grid, 1.0), emb)], dim=1)
            for emb, grid in zip(image_embeds_split, grids, strict=True)
        )

    def _postprocess_video_embeds_evs(
        self, video_embeds_split: tuple[torch.Tensor, ...], video_input: Any
    ) -> tuple[torch.Tensor, ...]:
        grids = video_input["video_grid_thw"].tolist()
        seconds = video_input.get("second_per_grid_ts")
        seconds = [1.0] * len(grids) if seconds is None else seconds.tolist()
        masks = getattr(video_input, "stts_keep_masks", None) or [None] * len(grids)
        tokens_per_second = self.config.vision_config.tokens_per_second
        out = []
        for emb, grid, second, mask in zip(video_embeds_split, grids, seconds, masks, strict=True):
            positions = self._media_positions(grid, second * tokens_per_second)
            encoded = encode_positions(positions, emb)
            if mask is not None:
                encoded = encoded[mask.to(encoded.device)]
            out.append(torch.cat([emb, encoded], dim=1))
        return tuple(out)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Strip the position columns and place kept tokens at their own (t, h, w).

        Replaces vLLM's `recompute_mrope_positions`, which fails when a prefill chunk ends
        between a vision-start token and its first media token."""
        embeds = [mm[:, :-POSITION_COLUMNS] for mm in multimodal_embeddings]
        if not multimodal_embeddings:  # nothing placed this step: positions are exact already
            ids_len = len(input_ids)
            delta = int(mrope_positions.max()) + 1 - ids_len if mrope_positions.numel() else 0
            return embeds, mrope_positions, delta
        ids = torch.as_tensor(input_ids).cpu()
        media = ids.eq(self.config.image_token_id) | ids.eq(self.config.video_token_id)
        carried = [decode_positions(mm[:, -POSITION_COLUMNS:]) for mm in multimodal_embeddings]
        try:
            positions = place_media_positions(media, carried, mrope_positions, num_computed_tokens)
        except ValueError:  # never take the engine down over one request's positions
            logger.exception("could not place pruned media positions; keeping previous ones")
            positions = mrope_positions
        delta = int(positions.max()) + 1 - len(ids) if positions.numel() else 0
        return embeds, positions, delta

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """Stock positions, except that each media item advances the prompt by its real
        (possibly pruned) placeholder length: the stock code assumes t*h*w and breaks on a
        prompt with two pruned videos. Pruned items' own columns are placeholders that
        `recompute_mrope_positions` overwrites once the encoder has chosen the kept units."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        columns: list[torch.Tensor] = []
        consumed = next_position = 0
        for feature, (offset, t, h, w, t_factor) in zip(
            features, self.iter_mm_grid_thw(mm_features), strict=True
        ):
            text_len = offset - consumed
            columns.append(torch.arange(text_len).expand(3, -1) + next_position)
            base = next_position + text_len
            grid = mrope_positions(t, h, w, t_factor)
            length = feature.mm_position.length
            columns.append(grid[:, :length] + base)
            next_position = base + int(grid.max()) + 1
            consumed = offset + length
        tail = len(input_tokens) - consumed
        columns.append(torch.arange(tail).expand(3, -1) + next_position)
        positions = torch.cat(columns, dim=1)
        delta = int(positions.max()) + 1 - len(input_tokens) if positions.numel() else 0
        return positions, delta

    # -- weights --

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.stts_scorer is None:  # heuristic scorer: scorer weights, if any, are unused
            weights = ((n, w) for n, w in weights if not n.startswith("stts_scorer."))
        loaded = super().load_weights(weights)
        if isinstance(self.stts_scorer, STTSScorer):
            expected = {f"stts_scorer.{n}" for n, _ in self.stts_scorer.named_parameters()}
            missing = sorted(expected - loaded)
            if missing:
                raise STTSConfigError(
                    f"stts.scorer is 'learned' but the checkpoint has no scorer weights "
                    f"({len(missing)} missing, e.g. {missing[0]}): add stts_scorer.safetensors "
                    "or set stts.scorer to 'heuristic'"
                )
        return loaded
