"""Supervised fine-tuning records for `stts-vllm train --data`: the two shapes video SFT data
comes in, read into one conversation form, each record checked before training starts.

- The LLaVA / Qwen-VL fine-tuning layout (a JSON list, or JSONL): `{"video": "rel/path.mp4"
  (or a list), "image": ..., "conversations": [{"from": "human", "value": "<video>\\n..."},
  {"from": "gpt", "value": "..."}, ...]}`. Each `<video>` (`<image>`) marks where its media
  goes, in order. As in LLaVA-NeXT's video data (LLaVA-Video-178K), a record with videos and no
  images may mark its videos with `<image>`.
- The OpenAI chat shape this server accepts: `{"messages": [{"role": ..., "content": str |
  [parts]}]}` with `text`, `video_url` and `image_url` parts (a path under `--video-root`, a
  `file://` path, or a `data:` URL), so a log of served requests becomes training data.

A bad record is a `RecordError` naming its file and line (a JSON list's line is where the
record starts); `skip_bad` skips and counts them instead. Never silently.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

Role = Literal["system", "user", "assistant"]
_LLAVA_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_PLACEHOLDER = re.compile(r"<(video|image)>\n?")


class RecordError(ValueError):
    """A record that cannot train: where it is, and why (`kind` groups the skipped ones)."""

    def __init__(self, where: str, kind: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.kind = kind


@dataclass(frozen=True)
class Media:
    kind: Literal["video", "image"]
    source: Path | bytes  # a file, or the bytes of a data URL

    def open_image(self) -> Any:
        """The image as PIL opens it (lazily: the header only until pixels are asked for)."""
        from PIL import Image

        source = self.source
        return Image.open(source if isinstance(source, Path) else io.BytesIO(source))


@dataclass(frozen=True)
class Part:
    """A text part, or a media item (the record's `media[index]`)."""

    text: str | None = None
    media: int | None = None


@dataclass(frozen=True)
class Turn:
    role: Role
    parts: tuple[Part, ...]

    def text(self) -> str:
        return "".join(p.text or "" for p in self.parts)


@dataclass(frozen=True)
class Record:
    turns: tuple[Turn, ...]
    media: tuple[Media, ...]
    where: str  # "file:line"


@dataclass
class ReadReport:
    """What reading the data found: records kept, and the bad ones skipped, by kind."""

    records: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "skipped": sum(self.skipped.values()),
            "skipped_by_kind": dict(self.skipped),
            "first_errors": self.first_errors,
        }


def read_records(
    files: Iterable[Path],
    video_root: Path | None,
    *,
    skip_bad: bool = False,
    check_media: bool = True,
    threads: int = 8,
) -> tuple[list[Record], ReadReport]:
    """Every record of `files`, checked (media exist, an assistant turn, placeholders match
    the media, and with `check_media` every video probes and every image opens, on `threads`
    threads); the first bad one raises unless `skip_bad`."""
    parsed: list[Record | RecordError] = []
    for path in files:
        for where, raw in _raw_records(Path(path)):
            try:
                parsed.append(parse_record(raw, where, video_root))
            except RecordError as error:
                parsed.append(error)
    if check_media:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            parsed = list(pool.map(_checked, parsed))
    records: list[Record] = []
    report = ReadReport()
    for item in parsed:
        if isinstance(item, Record):
            records.append(item)
            continue
        if not skip_bad:
            raise item
        report.skipped[item.kind] += 1
        if len(report.first_errors) < 10:
            report.first_errors.append(str(item))
    report.records = len(records)
    return records, report


def _checked(item: Record | RecordError) -> Record | RecordError:
    """The record, or the error of its first media file that cannot be decoded."""
    if isinstance(item, RecordError):
        return item
    from stts_vllm.media.decode import probe
    from stts_vllm.media.errors import MediaError

    for media in item.media:
        name = media.source if isinstance(media.source, Path) else "a data URL"
        try:
            if media.kind == "video":
                probe(media.source)
            else:
                with media.open_image() as image:
                    image.verify()
        except MediaError as error:
            return RecordError(item.where, "undecodable_video", f"{name}: {error.message}")
        except Exception as error:  # PIL raises many kinds for a bad image
            return RecordError(item.where, "undecodable_image", f"{name}: {error}")
    return item


def _raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, decoded JSON) per record: a JSON list's items or a JSONL file's lines."""
    try:
        text = path.read_text()
    except OSError as error:
        raise RecordError(str(path), "unreadable_file", f"cannot read: {error}") from error
    if text.lstrip().startswith("["):
        decoder = json.JSONDecoder()
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            where = f"{path}:{error.lineno}"
            raise RecordError(where, "invalid_json", f"not valid JSON ({error.msg})") from error
        position = text.index("[") + 1
        for item in items:
            while text[position] in " \t\r\n,":
                position += 1
            _, end = decoder.raw_decode(text, position)
            yield f"{path}:{text.count(chr(10), 0, position) + 1}", item
            position = end
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            yield where, _Invalid(error.msg)


@dataclass(frozen=True)
class _Invalid:
    message: str


def parse_record(raw: Any, where: str, video_root: Path | None) -> Record:
    """One record in either shape, checked; `RecordError` if it cannot train."""
    if isinstance(raw, _Invalid):
        raise RecordError(where, "invalid_json", f"not valid JSON ({raw.message})")
    if not isinstance(raw, dict):
        raise RecordError(where, "invalid_record", "a record must be a JSON object")
    if "messages" in raw:
        record = _openai_record(raw, where, video_root)
    elif "conversations" in raw:
        record = _llava_record(raw, where, video_root)
    else:
        raise RecordError(
            where, "invalid_record", 'a record needs "conversations" (LLaVA) or "messages"'
        )
    if not any(turn.role == "assistant" and turn.text().strip() for turn in record.turns):
        raise RecordError(where, "no_assistant_turn", "no assistant turn to learn from")
    if record.turns[-1].role != "assistant":
        raise RecordError(
            where, "no_assistant_turn", "the last turn must be the assistant's (its answer)"
        )
    return record


def _resolve(name: Any, where: str, video_root: Path | None, kind: str) -> Path | bytes:
    if not isinstance(name, str) or not name:
        raise RecordError(where, "invalid_record", f"a {kind} must be a path string")
    if name.startswith("data:"):
        header, _, payload = name.partition(",")
        if not header.endswith(";base64"):
            raise RecordError(where, "invalid_record", f"a {kind} data URL must be base64")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            message = f"bad base64 in a {kind} data URL"
            raise RecordError(where, "invalid_record", message) from error
    if name.startswith("file-"):
        raise RecordError(
            where,
            "invalid_record",
            f"{name}: uploaded file ids name the server's store, not a file; use its path",
        )
    if name.startswith("file://"):
        path = Path(unquote(urlparse(name).path))
    elif "://" in name:
        raise RecordError(where, "invalid_record", f"{name}: only local paths can be trained on")
    else:
        path = Path(name)
        if not path.is_absolute():
            if video_root is None:
                raise RecordError(where, "missing_file", f"{name} is relative: give --video-root")
            path = video_root / path
    if not path.is_file():
        raise RecordError(where, "missing_file", f"{kind} file not found: {path}")
    return path


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _llava_record(raw: dict[str, Any], where: str, video_root: Path | None) -> Record:
    videos = [_resolve(v, where, video_root, "video") for v in _as_list(raw.get("video"))]
    images = [_resolve(v, where, video_root, "image") for v in _as_list(raw.get("image"))]
    conversations = raw["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(where, "invalid_record", '"conversations" must be a non-empty list')
    texts = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(where, "invalid_record", 'each turn needs "from" and a "value"')
        if turn.get("from") not in _LLAVA_ROLES:
            raise RecordError(where, "invalid_record", f'unknown role "from": {turn.get("from")!r}')
        texts.append(turn["value"])
    marks = [m.group(1) for text in texts for m in _PLACEHOLDER.finditer(text)]
    # LLaVA-NeXT's video data marks a record's videos with <image>
    image_marks_videos = bool(videos) and not images and "video" not in marks
    wanted = {"video": len(videos), "image": len(images)}
    found = Counter("video" if image_marks_videos else m for m in marks)
    for kind in ("video", "image"):
        if found[kind] != wanted[kind]:
            raise RecordError(
                where,
                "placeholder_mismatch",
                f"{found[kind]} <{kind}> placeholder(s) for {wanted[kind]} {kind}(s)",
            )
    media = tuple([Media("video", v) for v in videos] + [Media("image", i) for i in images])
    next_of = {"video": 0, "image": len(videos)}
    turns = []
    for turn, text in zip(conversations, texts, strict=True):
        role = _LLAVA_ROLES[turn["from"]]
        parts: list[Part] = []
        position = 0
        for match in _PLACEHOLDER.finditer(text):
            if match.start() > position:
                parts.append(Part(text=text[position : match.start()]))
            kind = "video" if image_marks_videos else match.group(1)
            if role != "user":
                raise RecordError(where, "invalid_record", f"<{kind}> in a {role} turn")
            parts.append(Part(media=next_of[kind]))
            next_of[kind] += 1
            position = match.end()
        if position < len(text) or not parts:
            parts.append(Part(text=text[position:]))
        turns.append(Turn(role, tuple(parts)))
    return Record(tuple(turns), media, where)


def _openai_record(raw: dict[str, Any], where: str, video_root: Path | None) -> Record:
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(where, "invalid_record", '"messages" must be a non-empty list')
    media: list[Media] = []
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RecordError(where, "invalid_record", f"messages.{i}: unsupported role {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            parts = [Part(text=content)]
        elif isinstance(content, list):
            parts = []
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text" and isinstance(item.get("text"), str):
                    parts.append(Part(text=item["text"]))
                elif kind in ("video_url", "image_url") and role == "user":
                    url = (item.get(kind) or {}).get("url")
                    if isinstance(url, list):
                        raise RecordError(
                            where, "invalid_record", f"messages.{i}.content.{j}: frame lists "
                            "are not read for training; give the video file",
                        )  # fmt: skip
                    what = "video" if kind == "video_url" else "image"
                    media.append(Media(what, _resolve(url, where, video_root, what)))
                    parts.append(Part(media=len(media) - 1))
                else:
                    raise RecordError(
                        where,
                        "invalid_record",
                        f"messages.{i}.content.{j}: unsupported part {kind!r} in a {role} turn",
                    )
        else:
            raise RecordError(where, "invalid_record", f"messages.{i}: content must be text")
        turns.append(Turn(role, tuple(parts)))
    return Record(tuple(turns), tuple(media), where)
