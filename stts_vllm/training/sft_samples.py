"""A fine-tuning record to a training sample: the conversation through the checkpoint's own chat
template, the loss on the assistant's tokens only, and its videos decoded as the server decodes
them (`stts_vllm.media.video.read_video`).

Labels: every assistant turn's content and the end-of-turn token that closes it are targets
(the model learns to stop); the system prompt, user turns, media, the template's role headers
and the newline after each end of turn are not. The spans come from the template itself: the
conversation up to an assistant turn, rendered with the generation prompt, is the text before
that turn's answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stts_vllm.media.geometry import VisionGeometry, read_vision_geometry
from stts_vllm.media.sampling import FrameSampling
from stts_vllm.media.video import read_video
from stts_vllm.training.inputs import InputBuilder
from stts_vllm.training.model import Prepared
from stts_vllm.training.sft_data import Record, RecordError

END_OF_TURN = "<|im_end|>"
_PLACEHOLDERS = {"video": "<|video_pad|>", "image": "<|image_pad|>"}


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    labels: list[bool]
    media_order: list[int]  # the record's media index of each placeholder, in prompt order
    media_at: list[int]  # where each placeholder is in `ids`


def template_messages(record: Record) -> list[dict[str, Any]]:
    """The conversation as chat-template messages: media parts as `{"type": "video"}` /
    `{"type": "image"}` in place, assistant turns as plain text."""
    messages = []
    for turn in record.turns:
        if turn.role == "assistant":
            messages.append({"role": "assistant", "content": turn.text()})
            continue
        content = []
        for part in turn.parts:
            if part.media is not None:
                content.append({"type": record.media[part.media].kind})
            elif part.text:
                content.append({"type": "text", "text": part.text})
        messages.append({"role": turn.role, "content": content})
    return messages


def tokenize_record(tokenizer: Any, record: Record) -> Tokenized:
    """Ids and labels of the whole conversation (see the module's docstring)."""
    messages = template_messages(record)

    def render(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=prompt
        )

    full = render(len(messages), False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(k, True)
        if not full.startswith(before):
            raise RecordError(
                record.where,
                "template_mismatch",
                "the chat template renders this conversation's history differently from its "
                "prompt for the next answer; cannot tell the answer's tokens apart",
            )
        answer_end = full.find(END_OF_TURN, len(before) + len(message["content"]))
        if answer_end < 0:
            raise RecordError(record.where, "template_mismatch", f"no {END_OF_TURN} after turn {k}")
        answer_end += len(END_OF_TURN)
        pieces += [(full[done : len(before)], False), (full[len(before) : answer_end], True)]
        done = answer_end
    pieces.append((full[done:], False))
    ids: list[int] = []
    labels: list[bool] = []
    for text, target in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        labels += [target] * len(piece)
    kinds = [
        record.media[part.media].kind
        for t in record.turns
        for part in t.parts
        if part.media is not None
    ]
    order = [part.media for t in record.turns for part in t.parts if part.media is not None]
    pad_ids = {tokenizer.convert_tokens_to_ids(tok): kind for kind, tok in _PLACEHOLDERS.items()}
    media_at = [i for i, token in enumerate(ids) if token in pad_ids]
    if [pad_ids[ids[i]] for i in media_at] != kinds:
        raise RecordError(
            record.where, "template_mismatch", "the chat template did not place every media item"
        )
    return Tokenized(ids, labels, order, media_at)  # type: ignore[arg-type]


class RecordPreparer:
    """Record -> `Prepared`, with nothing but the checkpoint's processor: built once per
    DataLoader worker. Videos are sampled with `sampling` at the server's frame geometry,
    test-time scaling off: the frames the server gives the same file."""

    def __init__(
        self,
        checkpoint: Path,
        sampling: FrameSampling,
        pixels: tuple[int | None, int | None] = (None, None),
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.sampling = sampling
        self.pixels = pixels  # (min, max) over the processor's, as `stts-serve --frame-*-pixels`

    def __getstate__(self) -> dict[str, Any]:  # workers load their own processor
        return {"checkpoint": self.checkpoint, "sampling": self.sampling, "pixels": self.pixels}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @functools.cached_property
    def inputs(self) -> InputBuilder:
        return InputBuilder.from_checkpoint(self.checkpoint)

    @functools.cached_property
    def geometry(self) -> VisionGeometry:
        low, high = self.pixels
        return read_vision_geometry(self.checkpoint, min_pixels=low, max_pixels=high)

    def __call__(self, record: Record) -> Prepared:
        tokenized = tokenize_record(self.inputs.tokenizer, record)
        media = []
        for index in tokenized.media_order:
            item = record.media[index]
            if item.kind == "video":
                video = read_video(item.source, self.geometry, self.sampling)
                times = video.times if self.geometry.timestamped else None
                media.append(self.inputs.video(video.frames, video.fps, times))
            else:
                media.append(self.inputs.image(item.open_image().convert("RGB")))
        return Prepared(
            ids=tokenized.ids,
            labels=tokenized.labels,
            media=media,
            media_at=tokenized.media_at,
            sample=record,
        )
