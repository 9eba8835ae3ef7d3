"""transformers' Qwen2.5-VL or Qwen3-VL with STTS in its vision tower: the model training runs.

Loss = LM loss on the answer tokens + `aux_weight` x the scorer's temporal loss (the trainer
may add a REINFORCE term on explored draws: `Outputs.sample_losses`, `log_probs`). Several
samples share one sequence (packed: transformers starts a new causal block wherever the text
position row restarts), and kept video tokens sit at their original (t, h, w) M-RoPE
positions, exactly where vLLM's STTS model puts them, so a checkpoint saved here serves as is.
Qwen3-VL's prompt names each temporal step (`<t seconds>` + that step's kept tokens), and its
deepstack features are added to the LLM's first layers at the video tokens, as in vLLM.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from stts_vllm.checkpoint import (
    SCORER_FILE,
    SCORER_PREFIX,
    read_config,
    scorer_state_dict_to_file,
    set_architecture,
    write_stts_block,
)
from stts_vllm.core import (
    STTSConfig,
    STTSScorer,
    grid_placement,
    mrope_positions,
    prompt_mrope_positions,
    timestamped_video_positions,
)
from stts_vllm.core.mrope import Placement
from stts_vllm.families import Family, family_of_config, resolve_stts
from stts_vllm.training.hf_vision import pruned_vision_forward
from stts_vllm.training.inputs import InputBuilder, MediaInput
from stts_vllm.training.videoqa import VideoQA

# Files a checkpoint directory carries besides weights and config (tokenizer, processor).
_SIDE_FILES = (
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
    "vocab.json",
    "merges.txt",
)


def chat_prompt(tokenizer: Any, question: str) -> str:
    """The prompt of training and of every eval path: the chat template around one video and
    the question, ready for the answer word."""
    content = [{"type": "video"}, {"type": "text", "text": question}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


@dataclass
class Prepared:
    """One sample, tokenized and preprocessed: its token ids with one placeholder token
    (`<|video_pad|>`, `<|image_pad|>`) per media item, which ids are targets of the LM loss
    (the assistant's tokens), and the media in placeholder order. A video QA sample is one
    video, a question and a one-word answer; a fine-tuning record, a whole conversation."""

    ids: list[int]
    labels: list[bool]
    media: list[MediaInput]
    media_at: list[int]  # the index in `ids` of each media item's placeholder
    sample: Any = None

    # -- a one-video sample's view (the procedural video QA, its probes and tests) --

    @property
    def answer(self) -> list[int]:
        return [i for i, target in zip(self.ids, self.labels, strict=True) if target]

    @property
    def prefix(self) -> list[int]:
        return self.ids[: self.media_at[0]]

    @property
    def suffix(self) -> list[int]:
        return self.ids[self.media_at[0] + 1 : self.labels.index(True)]

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.media[0].pixel_values

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.media[0].grid

    @property
    def t_factor(self) -> float:
        return self.media[0].t_factor

    @property
    def step_texts(self) -> list[list[int]] | None:
        return self.media[0].step_texts


@dataclass
class Segment:
    """One sample laid out for the LLM: embeddings, `[4, n]` (text, t, h, w) positions, the
    rows whose logits predict the answer, which rows are video tokens, and those tokens'
    deepstack features (`[n_video, levels, width]`, levels 0 for Qwen2.5-VL)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    answer_rows: list[int]
    video_rows: torch.Tensor
    deepstack: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Outputs:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    temporal_loss: torch.Tensor
    answer_logits: list[torch.Tensor]  # per sample: logits for its first answer token
    video_tokens: list[int]  # per sample, after pruning
    scores: list[torch.Tensor | None]
    targets: list[torch.Tensor | None]
    sample_losses: torch.Tensor  # per sample: mean LM loss over its answer tokens (detached)
    # The sums behind the two means, with gradients, and what they sum over: a trainer that
    # splits one batch over micro-batches or processes normalises by the whole batch's counts.
    lm_sum: torch.Tensor
    targets_count: int
    temporal_sum: torch.Tensor
    temporal_count: int
    log_probs: list[torch.Tensor | None]  # per sample: log-probability of an explored draw


class STTSVideoQAModel(nn.Module):
    def __init__(
        self,
        hf: nn.Module,
        processor: Any,
        stts: STTSConfig,
        scorer: nn.Module | None,
        family: Family,
    ):
        super().__init__()
        self.hf = hf
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.stts = stts
        self.scorer = scorer
        self.family = family
        self.inputs = InputBuilder(processor, family, hf.config.vision_config)
        self.video_pad = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.image_pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.vision_start = self.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end = self.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        vision = hf.config.vision_config
        self.unit = vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        self.tokens_per_second = getattr(vision, "tokens_per_second", 1.0)
        self.text_width = hf.config.text_config.hidden_size
        self.row_tokens = 1024
        # transformers' own vision blocks instead of the driver's batched ones (a reference)
        self.stock_vision_blocks = False
        # bfloat16: mixed precision (weights and optimizer stay float32, matmuls and attention
        # run in bfloat16; on a GPU the pruned windows then take FlashAttention varlen)
        self.autocast_dtype: torch.dtype | None = None

    # -- loading and saving --

    @classmethod
    def from_checkpoint(cls, path: Path, scorer: str = "learned") -> STTSVideoQAModel:
        """Load an STTS (or stock) Qwen2.5-VL / Qwen3-VL directory; a learned scorer without
        weights in the checkpoint starts from a fresh initialisation."""
        import transformers
        from transformers import AutoProcessor

        path = Path(path)
        config = read_config(path)
        family = family_of_config(config, str(path / "config.json"))
        hf_class = getattr(transformers, family.stock_architecture)
        hf = hf_class.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(path)
        raw = dict(config.get("stts") or {})
        raw["scorer"] = scorer
        stts = resolve_stts(STTSConfig.from_dict(raw), family)
        module = None
        if scorer == "learned":
            width = hf.config.vision_config.hidden_size
            module = STTSScorer(width, stts.scorer_hidden_size or width)
            if (path / SCORER_FILE).is_file():
                state = load_file(str(path / SCORER_FILE))
                module.load_state_dict({k.removeprefix(SCORER_PREFIX): v for k, v in state.items()})
        return cls(hf, processor, stts, module, family)

    def save(
        self,
        out: Path,
        source: Path,
        state_dict: dict[str, torch.Tensor] | None = None,
        scorer_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write an STTS checkpoint directory that vLLM's plugin serves as is (`state_dict`,
        `scorer_state`: the weights to write, e.g. gathered from shards; default: the
        model's own)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(out, state_dict=state_dict)
        for name in _SIDE_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, out / name)
        set_architecture(out, self.family.stts_architecture)
        write_stts_block(out, self.stts.to_dict())
        if self.scorer is not None:
            scorer = scorer_state if scorer_state is not None else self.scorer.state_dict()
            scorer_state_dict_to_file(scorer, out / SCORER_FILE)
        return out

    # -- inputs --

    def answer_ids(self, word: str) -> list[int]:
        ids = self.tokenizer.encode(" " + word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer {word!r} is {len(ids)} tokens in this tokenizer, not one")
        return ids

    def prepare(self, sample: VideoQA) -> Prepared:
        """A procedural video QA sample: the chat prompt around its video, then the answer
        word and the end of the turn as the targets."""
        ids = self.tokenizer.encode(
            chat_prompt(self.tokenizer, sample.question), add_special_tokens=False
        )
        answer = [*self.answer_ids(sample.answer), self.end_of_turn]
        return Prepared(
            ids=[*ids, *answer],
            labels=[False] * len(ids) + [True] * len(answer),
            media=[self.inputs.video(sample.frames, sample.fps)],
            media_at=[ids.index(self.video_pad)],
            sample=sample,
        )

    def _media_span(self, media: MediaInput, keep: torch.Tensor | None) -> list[int]:
        """The tokens that stand for one media item: one pad per kept unit (Qwen2.5-VL
        videos, every image), or per step its timestamp, vision start, its kept units' pads,
        vision end (Qwen3-VL videos)."""
        t, h, w = media.grid
        units = (h // self.unit) * (w // self.unit)
        if media.kind == "image":
            return [self.image_pad] * (t * units)
        if not self.family.timestamped:
            return [self.video_pad] * (t * units if keep is None else int(keep.sum()))
        counts = [units] * t if keep is None else keep.view(t, units).sum(1).tolist()
        assert media.step_texts is not None
        span: list[int] = []
        for text, count in zip(media.step_texts, counts, strict=True):
            span += [*text, self.vision_start, *[self.video_pad] * int(count), self.vision_end]
        return span

    def _video_span(self, item: Prepared, keep: torch.Tensor | None) -> list[int]:
        """A one-video sample's video tokens (the probes read them)."""
        return self._media_span(item.media[0], keep)

    def _place(
        self, media: MediaInput, keep: torch.Tensor | None, span: list[int], start: int
    ) -> Placement:
        """One media item's M-RoPE positions from `start`, as vLLM places them: kept units at
        their own positions, the text after resuming past the unpruned extent."""
        t, h, w = media.grid
        units_h, units_w = h // self.unit, w // self.unit
        if media.kind == "video" and self.family.timestamped:
            return timestamped_video_positions(
                span,
                units_h,
                units_w,
                start,
                video_token=self.video_pad,
                vision_start=self.vision_start,
                vision_end=self.vision_end,
                keep_mask=keep,
            )
        grid = mrope_positions(t, units_h, units_w, media.t_factor)
        return grid_placement(grid, start, slice(None) if keep is None else keep.cpu())

    # -- forward --

    def forward(
        self,
        batch: Sequence[Prepared],
        keep_ratios: Sequence[float],
        aux_weight: float = 0.5,
        explore: float = 0.0,
    ) -> Outputs:
        device = next(self.hf.parameters()).device
        dtype = self.autocast_dtype
        # None leaves a caller's own autocast (or none) alone
        mixed = nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
        with mixed:
            return self._forward(batch, keep_ratios, aux_weight, explore, device)

    def _forward(
        self,
        batch: Sequence[Prepared],
        keep_ratios: Sequence[float],
        aux_weight: float,
        explore: float,
        device: torch.device,
    ) -> Outputs:
        media = [m for item in batch for m in item.media]
        # a sample's keep ratio prunes its videos; images are never pruned
        keeps = [
            keep if m.kind == "video" else 1.0
            for item, keep in zip(batch, keep_ratios, strict=True)
            for m in item.media
        ]
        vision = pruned_vision_forward(
            self.hf.model.visual,
            torch.cat([m.pixel_values for m in media]).to(device),
            [m.grid for m in media],
            keeps,
            config=self.stts,
            scorer=self.scorer,
            selection=self.stts.selection,
            explore=explore,
            stock_blocks=self.stock_vision_blocks,
        )
        embed = self.hf.model.get_input_embeddings()
        segments: list[Segment] = []
        targets: list[int] = []
        owned: list[range] = []  # each sample's media, as indices into `media`
        for item in batch:
            first = owned[-1].stop if owned else 0
            owned.append(range(first, first + len(item.media)))
            encoded = [vision.embeds[i] for i in owned[-1]]
            masks = [vision.keep_masks[i] for i in owned[-1]]
            segment, item_targets = self._segment(item, encoded, masks, embed, device)
            segments.append(segment)
            targets += item_targets
        hidden = self._packed_llm(segments, device)
        logits = self.hf.lm_head(hidden)
        token_losses = F.cross_entropy(
            logits.float(), torch.tensor(targets, device=device), reduction="none"
        )
        lm_loss = token_losses.mean()
        counts = [len(segment.answer_rows) for segment in segments]
        per_sample = token_losses.detach().split(counts)
        temporal = vision.temporal_loss
        if temporal is None:
            temporal = logits.new_zeros(())
        firsts, start = [], 0
        for count in counts:
            firsts.append(logits[start].detach())
            start += count
        log_probs = []
        for indices in owned:
            drawn = [vision.log_probs[i] for i in indices if vision.log_probs[i] is not None]
            log_probs.append(torch.stack(drawn).sum() if drawn else None)
        if self.scorer is not None and self.training:
            # Samples that all keep 1.0 never call the scorer: a zero term keeps its weights
            # in the graph, so data-parallel ranks reduce the same gradients whatever their
            # samples drew (DDP, FSDP).
            touch = sum(p.sum() for p in self.scorer.parameters() if p.requires_grad)
            temporal = temporal + 0.0 * touch
        return Outputs(
            loss=lm_loss + aux_weight * temporal,
            lm_loss=lm_loss.detach(),
            temporal_loss=temporal.detach(),
            answer_logits=firsts,
            video_tokens=[
                sum(vision.embeds[i].shape[0] for i in indices if media[i].kind == "video")
                for indices in owned
            ],
            scores=vision.scores,
            targets=vision.targets,
            sample_losses=torch.stack([loss.mean() for loss in per_sample]),
            log_probs=log_probs,
            lm_sum=token_losses.sum(),
            targets_count=len(targets),
            temporal_sum=temporal * vision.temporal_terms if vision.temporal_terms else temporal,
            temporal_count=vision.temporal_terms,
        )

    def _segment(
        self,
        item: Prepared,
        encoded: Sequence[torch.Tensor],
        keep_masks: Sequence[torch.Tensor | None],
        embed: nn.Module,
        device: torch.device,
    ) -> tuple[Segment, list[int]]:
        """One sample laid out for the LLM, and its targets: each placeholder expanded to its
        media's (kept) tokens and their embeddings, positions as vLLM computes them, and the
        rows that predict each target id."""
        ids: list[int] = []
        labels: list[bool] = []
        runs: list[tuple[int, int]] = []
        spans: list[list[int]] = []
        previous = 0
        for at, media, keep in zip(item.media_at, item.media, keep_masks, strict=True):
            ids += item.ids[previous:at]
            labels += item.labels[previous:at]
            span = self._media_span(media, keep)
            runs.append((len(ids), len(span)))
            spans.append(span)
            ids += span
            labels += [False] * len(span)
            previous = at + 1
        ids += item.ids[previous:]
        labels += item.labels[previous:]
        # A last target is only a target, never an input.
        inputs = ids[:-1] if labels[-1] else ids
        tokens = torch.tensor(inputs)
        embeds = embed(tokens.to(device))
        # Main embeddings first; Qwen3-VL's deepstack levels follow on the last dim.
        features = torch.cat(list(encoded))
        main, deepstack = features[:, : self.text_width], features[:, self.text_width :]
        is_media = tokens.eq(self.video_pad) | tokens.eq(self.image_pad)
        embeds = embeds.masked_scatter(is_media.to(device).unsqueeze(-1), main.to(embeds.dtype))

        def place(i: int, start: int) -> Placement:
            return self._place(item.media[i], keep_masks[i], spans[i], start)

        mrope, _ = prompt_mrope_positions(len(inputs), runs, place)
        text = torch.arange(len(inputs))
        targets = [i for i, target in enumerate(labels) if target]
        segment = Segment(
            embeds=embeds,
            positions=torch.cat([text.view(1, -1), mrope]),
            answer_rows=[i - 1 for i in targets],
            video_rows=is_media,
            deepstack=deepstack.reshape(main.shape[0], -1, self.text_width),
        )
        return segment, [ids[i] for i in targets]

    def _packed_llm(self, segments: list[Segment], device: torch.device) -> torch.Tensor:
        """Run the LLM on samples packed into rows of about `row_tokens` tokens (attention
        is quadratic in the row, so one huge row would waste most of it on masked pairs);
        returns the hidden states of every sample's answer rows, in sample order. Deepstack
        features (Qwen3-VL) are added at the video tokens of the first LLM layers."""
        rows: list[list[int]] = [[]]
        used = 0
        for i, segment in enumerate(segments):
            if rows[-1] and used + len(segment) > self.row_tokens:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += len(segment)
        lengths = [sum(len(segments[i]) for i in row) for row in rows]
        width = max(lengths)
        inputs, positions, video_rows, picks = [], [], [], []
        for r, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            parts = [segments[i].embeds for i in row]
            pos = [segments[i].positions for i in row]
            flags = [segments[i].video_rows for i in row]
            offset = 0
            for i in row:
                picks += [(r, offset + a) for a in segments[i].answer_rows]
                offset += len(segments[i])
            if length < width:  # padding: its own packed block, never attended to
                pad = width - length
                parts.append(parts[0].new_zeros(pad, parts[0].shape[1]))
                pos.append(torch.arange(pad).expand(4, -1))
                flags.append(torch.zeros(pad, dtype=torch.bool))
            inputs.append(torch.cat(parts))
            positions.append(torch.cat(pos, dim=1))
            video_rows.append(torch.cat(flags))
        extra: dict[str, Any] = {}
        levels = segments[0].deepstack.shape[1]
        if levels:  # row-major, as the visual tokens appear in the packed batch
            features = torch.cat([segments[i].deepstack for row in rows for i in row])
            extra["visual_pos_masks"] = torch.stack(video_rows).to(device)
            extra["deepstack_visual_embeds"] = list(features.unbind(1))
        hidden = self.hf.model.language_model(
            inputs_embeds=torch.stack(inputs),
            position_ids=torch.stack(positions, dim=1).to(device),
            use_cache=False,
            **extra,
        ).last_hidden_state
        index = torch.tensor(picks, device=device)
        return hidden[index[:, 0], index[:, 1]]

    @torch.no_grad()
    def predict(self, batch: Sequence[Prepared], keep_ratio: float) -> list[str]:
        """Greedy first answer token, decoded and stripped: what vLLM answers at temperature 0."""
        out = self.forward(batch, [keep_ratio] * len(batch))
        ids = [int(logits.argmax()) for logits in out.answer_logits]
        return [self.tokenizer.decode([i]).strip() for i in ids]
