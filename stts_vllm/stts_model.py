"""What every STTS model class adds to its stock vLLM class, whatever the family.

A family module (`qwen2_5_vl.py`, `qwen3_vl.py`) reads as "the stock model, except ...": its
processor sizes video placeholders with the shared count functions and its position code
places kept units; the per-request keep ratio, the pruned tower call, the carried keep masks,
the placement of kept tokens after the encoder runs and the scorer weights live here once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLVideoPixelInputs
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.utils.gpu_sync_debug import gpu_sync_allowed
from vllm.utils.tensor_schema import TensorShape

from stts_vllm.core import STTSConfig, STTSScorer
from stts_vllm.core.config import STTSConfigError, check_keep_ratio
from stts_vllm.core.packing import budget_batches
from stts_vllm.core.selection import retained_count
from stts_vllm.encoder_budget import encoder_patch_budget, timed_encoder
from stts_vllm.families import Family, resolve_stts
from stts_vllm.positions import (
    POSITION_COLUMNS,
    decode_positions,
    encode_positions,
    place_media_positions,
)
from stts_vllm.pruned_vision import install_biased_kernel, pruned_vision_forward
from stts_vllm.sharded_videos import run_sharded


class PositionMismatchError(RuntimeError):
    """Kept media tokens whose carried positions do not fit their prompt's placeholders."""


KEEP_RATIO_KWARG = "stts_keep_ratio"
"""Per-request keep ratio: `mm_processor_kwargs={"stts_keep_ratio": r}`."""


def kept_video_tokens(grid_thw: Sequence[int], merge: int, keep_ratio: float) -> int:
    """Embeddings the pruned tower returns for a video of `grid_thw` patches: its kept units."""
    t, h, w = (int(x) for x in grid_thw)
    return retained_count(t, (h // merge) * (w // merge), keep_ratio)


def stts_config_of(hf_config: Any, family: Family) -> STTSConfig:
    """The checkpoint's validated `stts` block, with the family's selection filled in (errors
    name the field)."""
    raw = getattr(hf_config, "stts", None)
    if raw is None:
        raise STTSConfigError(
            f"config.json of an {family.stts_architecture} checkpoint needs an `stts` block "
            "(make one with `stts-vllm convert`)"
        )
    config = STTSConfig.from_dict(dict(raw))
    config.check_vit_depth(hf_config.vision_config.depth)
    return resolve_stts(config, family)


@dataclasses.dataclass
class EncoderCalls:
    """Calls of the pruned tower this model made (engine profiling included): how many, with
    how many videos and unpruned patches, the most patches one call took (what the patch
    budget bounds), and their time. The server exports them (`stts_encoder_*`).

    Time is exact on the CPU. On a GPU it needs a device sync after each call, which holds
    the host back from queueing the next work, so it is only measured with
    `STTS_ENCODER_TIMING=1` (otherwise it stays 0)."""

    calls: int = 0
    videos: int = 0
    patches: int = 0
    largest_patches: int = 0
    seconds: float = 0.0

    def record(self, patches: int, videos: int, seconds: float = 0.0) -> None:
        self.calls += 1
        self.videos += videos
        self.patches += patches
        self.largest_patches = max(self.largest_patches, patches)
        self.seconds += seconds


class STTSVideoPixelInputs(Qwen2_5_VLVideoPixelInputs):
    """The stock video pixels plus each item's keep ratio.

    Dimensions:
        - nv: Number of videos
    """

    stts_keep_ratio: Annotated[torch.Tensor, TensorShape("nv")]


class STTSProcessingInfoMixin:
    """For a family's `ProcessingInfo`: the checkpoint's config and the request's ratio."""

    stts_family: Family

    def get_stts_config(self) -> STTSConfig:
        return stts_config_of(self.get_hf_config(), self.stts_family)  # type: ignore[attr-defined]

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(KEEP_RATIO_KWARG, None)  # ours, not the HF processor's
        return super().get_hf_processor(**kwargs)  # type: ignore[misc]

    def resolve_keep_ratio(self, requested: object) -> float:
        if requested is None:
            return self.get_stts_config().keep_ratio
        return check_keep_ratio(requested, KEEP_RATIO_KWARG)

    def planned_video_tokens(self, item: Any) -> int | None:
        """How many embeddings the pruned tower returns for a processed video item (its kept
        units), from its grid and keep ratio; None for precomputed embeddings."""
        grid = item.get("video_grid_thw") if item is not None else None
        if grid is None or item.get("pixel_values_videos") is None:
            return None
        merge = self.get_hf_config().vision_config.spatial_merge_size  # type: ignore[attr-defined]
        return kept_video_tokens(grid.data, merge, STTSProcessorMixin.item_keep_ratio(item))

    def check_placeholder_tokens(self, inputs: Any) -> None:
        """One placeholder run per media item, no placeholder token elsewhere: kept tokens
        are placed by finding their placeholder runs in the prompt, so a stray pad token (a
        literal `<|image_pad|>` typed in text) would misplace them. Checked before any cache
        is touched, so refusing the request leaves the processor caches consistent."""
        config = self.get_hf_config()  # type: ignore[attr-defined]
        counts = inputs.mm_data_items.get_all_counts()
        for modality, token in (("image", config.image_token_id), ("video", config.video_token_id)):
            found = sum(1 for t in inputs.prompt if t == token)
            if found != counts.get(modality, 0):
                raise ValueError(
                    f"prompt has {found} {modality} placeholder token(s) for "
                    f"{counts.get(modality, 0)} {modality} item(s): one each, none in the text"
                )


class STTSProcessorMixin:
    """For a family's multimodal processor (first in its bases): placeholders checked before
    anything is cached, the request's keep ratio taken out of the HF processor's kwargs and
    attached to each video item, which carries it to the model and the prompt updates."""

    info: Any

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        self.info.check_placeholder_tokens(inputs)
        processed = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        self.check_video_layout(processed)
        return processed

    def check_video_layout(self, processed: Any) -> None:
        """Each video's placeholder must hold exactly as many video tokens as the pruned tower
        will return for it. The runner slices encoder outputs by placeholder, so a mismatch
        would not fail there: kept tokens would be dropped or shifted and their positions
        placed on the wrong tokens, a silently wrong answer. Refused here, for this request
        only, before the engine sees it (vLLM's runner has no per-request error path)."""
        video_token = self.info.get_hf_config().video_token_id
        ids = processed["prompt_token_ids"]
        items = processed["mm_kwargs"].get("video", [])
        placeholders = processed["mm_placeholders"].get("video", [])
        if len(items) != len(placeholders):
            raise ValueError(f"{len(placeholders)} video placeholders for {len(items)} videos")
        for index, (item, placeholder) in enumerate(zip(items, placeholders, strict=True)):
            planned = self.info.planned_video_tokens(item)
            if planned is None:
                continue
            span = ids[placeholder.offset : placeholder.offset + placeholder.length]
            found = sum(1 for token in span if token == video_token)
            if found != planned or placeholder.get_num_embeds() != planned:
                raise ValueError(
                    f"video {index}: the prompt holds {found} video tokens "
                    f"({placeholder.get_num_embeds()} embedding slots) but the pruned tower "
                    f"returns {planned} for it; refusing rather than misplacing its tokens"
                )

    def split_keep_ratio(self, hf_kwargs: Mapping[str, object]) -> tuple[float, dict]:
        """The request's value, else the server's --mm-processor-kwargs, else the
        checkpoint's; and the kwargs without it (the HF processor does not know it)."""
        merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)
        keep_ratio = self.info.resolve_keep_ratio(merged.get(KEEP_RATIO_KWARG))
        return keep_ratio, {k: v for k, v in hf_kwargs.items() if k != KEEP_RATIO_KWARG}

    @staticmethod
    def attach_keep_ratio(outputs: Any, keep_ratio: float) -> None:
        outputs[KEEP_RATIO_KWARG] = torch.full((len(outputs["video_grid_thw"]),), keep_ratio)

    def _get_mm_fields_config(
        self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return dict(
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),  # type: ignore[misc]
            **{KEEP_RATIO_KWARG: MultiModalFieldConfig.batched("video", keep_on_cpu=True)},
        )

    @staticmethod
    def item_keep_ratio(item: Any) -> float:
        """A processed video item's ratio; precomputed video embeddings bypass the HF
        processor and carry none: nothing to prune there."""
        keep = item.get(KEEP_RATIO_KWARG)
        return 1.0 if keep is None else float(keep.data)


class STTSModelMixin:
    """For a family's model class (first in its bases, before the stock class).

    The model always runs in vLLM's multimodal pruning mode (the plugin's config hook turns it
    on), so each media item's embeddings carry their M-RoPE positions as extra columns and the
    runner calls `recompute_mrope_positions` once the encoder has chosen the kept units.
    """

    stts_family: Family
    config: Any
    visual: Any
    stts_batches_videos = True
    """Bounds its own encoder calls by unpruned patches: the plugin's runner hook hands it a
    step's videos together (`plugin.patch_runner_video_batches`)."""

    def _init_stts(self, vllm_config: VllmConfig) -> None:
        self.stts_config = stts_config_of(self.config, self.stts_family)
        self.stts_scorer: STTSScorer | None = None
        # Unpruned patches per call of the pruned tower (`encoder_budget`).
        self.stts_patch_budget = encoder_patch_budget(
            vllm_config, self.config.vision_config.spatial_merge_size
        )
        self.stts_encoder_calls = EncoderCalls()
        if self.visual is not None:
            install_biased_kernel(self.visual, self.stts_config.prune_at + 1)
        if self.stts_config.scorer == "learned":
            with self._mark_tower_model(vllm_config, "video"):  # type: ignore[attr-defined]
                # float32 whatever the model dtype: see `score_units`.
                self.stts_scorer = STTSScorer(
                    self.config.vision_config.hidden_size, self.stts_config.scorer_hidden_size
                ).float()

    # -- video encoding --

    def _parse_and_validate_video_input(self, **kwargs: object) -> Any:
        video_input = super()._parse_and_validate_video_input(**kwargs)  # type: ignore[misc]
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
            second_per_grid_ts=video_input.get("second_per_grid_ts"),
            timestamps=video_input.get("timestamps"),
            stts_keep_ratio=keep_ratio,
        )

    def _process_video_input(self, video_input: Any) -> tuple[torch.Tensor, ...]:
        if not isinstance(video_input, STTSVideoPixelInputs):
            return super()._process_video_input(video_input)  # type: ignore[misc]
        with gpu_sync_allowed():  # per-item sizes and ratios, as stock EVS reads them
            keep_ratios = video_input["stts_keep_ratio"].reshape(-1).tolist()
            grids = video_input["video_grid_thw"].tolist()
        if all(k >= 1.0 for k in keep_ratios):
            return super()._process_video_input(video_input)  # type: ignore[misc]
        # The videos go through the tower together (one packed pass per block, each video
        # selected on its own), in as few calls as the patch budget allows: the blocks before
        # the pruning point see every patch, so calls are bounded by unpruned patches.
        sizes = [t * h * w for t, h, w in grids]
        pixels = video_input["pixel_values_videos"].split(sizes)
        merge = self.config.vision_config.spatial_merge_size
        timing = timed_encoder(pixels[0].device)

        def encode(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for batch in budget_batches([sizes[i] for i in indices], self.stts_patch_budget):
                chosen = [indices[b] for b in batch]
                start = time.perf_counter()
                pruned = self._pruned_vision_forward(
                    self.visual,
                    torch.cat([pixels[i] for i in chosen])
                    if len(chosen) > 1
                    else pixels[chosen[0]],
                    [grids[i] for i in chosen],
                    [keep_ratios[i] for i in chosen],
                    config=self.stts_config,
                    scorer=self.stts_scorer,
                    selection=self.stts_config.selection,
                )
                seconds = 0.0
                if timing:
                    torch.accelerator.synchronize()
                    seconds = time.perf_counter() - start
                patches = sum(sizes[i] for i in chosen)
                self.stts_encoder_calls.record(patches, len(chosen), seconds)
                for embeds, mask in zip(pruned.embeds, pruned.keep_masks, strict=True):
                    if mask is None:  # keep 1.0: every unit
                        mask = torch.ones(embeds.shape[0], dtype=torch.bool, device=embeds.device)
                    out.append((embeds, mask))
            return out

        if getattr(self, "use_data_parallel", False):
            results = self._encode_sharded(grids, keep_ratios, merge, encode)
        else:
            results = encode(list(range(len(grids))))
        # Carried with this call's data (not on self) to the position step.
        video_input.stts_keep_masks = [mask for _, mask in results]  # type: ignore[attr-defined]
        return tuple(embeds for embeds, _ in results)

    def _encode_sharded(
        self,
        grids: list[list[int]],
        keep_ratios: list[float],
        merge: int,
        encode: Any,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`mm_encoder_tp_mode="data"`: each rank prunes its share of the videos and the
        embeddings and keep masks are gathered (`sharded_videos`)."""
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
            tensor_model_parallel_all_gather,
        )

        units = [t * (h // merge) * (w // merge) for t, h, w in grids]
        kept = [
            kept_video_tokens(grid, merge, keep)
            for grid, keep in zip(grids, keep_ratios, strict=True)
        ]
        return run_sharded(
            [t * h * w for t, h, w in grids],
            kept,
            units,
            encode,
            rank=get_tensor_model_parallel_rank(),
            world=get_tensor_model_parallel_world_size(),
            all_gather=lambda x: tensor_model_parallel_all_gather(x, dim=0),
            width=self.visual.out_hidden_size,
            dtype=self.visual.dtype,
            device=self.visual.device,
        )

    def _pruned_vision_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The pruned tower; a method so that a test can spy on one live model's calls."""
        return pruned_vision_forward(*args, **kwargs)

    # -- positions --

    def media_positions(self, modality: str, grid_thw: Sequence[int], inputs: Any, index: int):
        """`[3, N]` M-RoPE positions of every unit of item `index` (original order), relative
        to the token after its vision start. The family's own rule."""
        raise NotImplementedError

    def _with_positions(self, modality: str, embeds: Sequence[torch.Tensor], inputs: Any) -> tuple:
        """Each item's embeddings with its kept units' positions appended as columns
        (vLLM's pruning format); the masks the pruned tower chose travel with `inputs`."""
        grids = inputs[f"{modality}_grid_thw"]
        if isinstance(grids, torch.Tensor):
            with gpu_sync_allowed():
                grids = grids.tolist()
        masks = getattr(inputs, "stts_keep_masks", None) or [None] * len(grids)
        out = []
        for index, (emb, grid, mask) in enumerate(zip(embeds, grids, masks, strict=True)):
            encoded = encode_positions(self.media_positions(modality, grid, inputs, index), emb)
            if mask is not None:
                encoded = encoded[mask.to(encoded.device)]
            out.append(torch.cat([emb, encoded], dim=1))
        return tuple(out)

    def _postprocess_image_embeds_evs(
        self, image_embeds_split: tuple[torch.Tensor, ...], image_input: Any
    ) -> tuple[torch.Tensor, ...]:
        return self._with_positions("image", image_embeds_split, image_input)

    def _postprocess_video_embeds_evs(
        self, video_embeds_split: tuple[torch.Tensor, ...], video_input: Any
    ) -> tuple[torch.Tensor, ...]:
        return self._with_positions("video", video_embeds_split, video_input)

    # -- encoder CUDA graphs: images keep theirs --

    def get_encoder_cudagraph_config(self) -> Any:
        """Stock turns encoder CUDA graphs off for every modality in pruning mode (its graph
        path skips the position columns). Images are never pruned, so they keep their graphs
        and get their columns in `postprocess_encoder_output`; videos run eagerly, since their
        keep ratio is per request and pruning happens inside the tower."""
        config = super().get_encoder_cudagraph_config()  # type: ignore[misc]
        if not getattr(self, "is_multimodal_pruning_enabled", False):
            return config
        # The DP gather sizes its buffers by this width: the columns travel with the output.
        return dataclasses.replace(
            config,
            modalities=["image"],
            max_frames_per_video=1,
            out_hidden_size=config.out_hidden_size + POSITION_COLUMNS,
        )

    def postprocess_encoder_output(
        self,
        outputs: dict[str, torch.Tensor],
        indices: list[int],
        per_item_out_tokens: list[int],
        dest: dict[int, torch.Tensor] | list[torch.Tensor | None],
        clone: bool = False,
        batch_mm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """The graph (or its eager fallback) output of a batch of images, in the format eager
        images have in pruning mode: each item with its positions as extra columns."""
        super().postprocess_encoder_output(  # type: ignore[misc]
            outputs, indices, per_item_out_tokens, dest, clone, batch_mm_kwargs
        )
        if not getattr(self, "is_multimodal_pruning_enabled", False):
            return
        if batch_mm_kwargs is None or "image_grid_thw" not in batch_mm_kwargs:
            raise PositionMismatchError("encoder graph output without its image grids")
        # The sub-batch's k-th item is `indices[k]`: the same per-item step as eager images.
        raw = [dest[index] for index in indices]
        with_columns = self._with_positions("image", raw, batch_mm_kwargs)  # type: ignore[arg-type]
        for index, embeds in zip(indices, with_columns, strict=True):
            dest[index] = embeds

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Strip the position columns and place kept tokens at their own positions.

        Replaces vLLM's `recompute_mrope_positions`, which fails when a prefill chunk ends
        between a vision-start token and its first media token."""
        embeds = [mm[:, :-POSITION_COLUMNS] for mm in multimodal_embeddings]
        if not multimodal_embeddings:  # nothing placed this step: positions are exact already
            with gpu_sync_allowed():
                top = int(mrope_positions.max()) if mrope_positions.numel() else -1
            delta = top + 1 - len(input_ids) if mrope_positions.numel() else 0
            return embeds, mrope_positions, delta
        with gpu_sync_allowed():  # the V2 runner hands the prompt over on the GPU
            ids = torch.as_tensor(input_ids).cpu()
            media = ids.eq(self.config.image_token_id) | ids.eq(self.config.video_token_id)
            carried = [
                decode_positions(mm[:, -POSITION_COLUMNS:]).cpu() for mm in multimodal_embeddings
            ]
            try:
                positions = place_media_positions(
                    media, carried, mrope_positions.cpu(), num_computed_tokens
                )
            except ValueError as err:
                # The processor refuses every request whose placeholders disagree with the
                # tower (`check_video_layout`), so this is an engine bug: keeping stale
                # positions would answer wrongly and silently.
                raise PositionMismatchError(
                    f"pruned media positions do not fit the prompt: {err}"
                ) from err
            delta = int(positions.max()) + 1 - len(ids) if positions.numel() else 0
        return embeds, positions.to(mrope_positions.device), delta

    # -- weights --

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.stts_scorer is None:  # heuristic scorer: scorer weights, if any, are unused
            weights = ((n, w) for n, w in weights if not n.startswith("stts_scorer."))
        loaded = super().load_weights(weights)  # type: ignore[misc]
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
