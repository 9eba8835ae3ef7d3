"""OpenAI chat messages -> vLLM's conversation format (media as `{"type": "image" | "video"}`
placeholders for the chat template) plus the media the engine needs, loaded by our own media
pipeline (frame plan, STTS test-time scaling, decoded-frame cache, uploaded file ids), and a
report of what STTS did. All media of a request load concurrently.

This stays ours instead of vLLM's message parser because vLLM's fetches and samples videos
itself (its media connectors), which would bypass the frame plan, the keep ratio's test-time
scaling and the decode cache. Everything else about a message (roles, names, `tool` messages,
assistant `tool_calls`) is passed on as vLLM passes it to the chat template.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import ValidationError

from server.chat_request import FRAME_LIST_SCHEME
from server.errors import APIError
from server.frame_sampling import video_tokens
from server.media import LoadedVideo
from server.schemas import STTSOptions, STTSReport, VideoReport
from server.state import AppState
from server.video_options import resolve_video_options

# Content part types that carry text, as vLLM's parser reads them.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
_SUPPORTED_PARTS = sorted([*_TEXT_PARTS, "image_url", "video_url"])


@dataclass
class LoadedChat:
    conversation: list[dict[str, Any]]
    multi_modal_data: dict[str, Any]
    mm_processor_kwargs: dict[str, Any]
    report: STTSReport | None
    videos: list[LoadedVideo] = field(default_factory=list)


def resolve_keep_ratio(options: STTSOptions, state: AppState) -> float:
    facts = state.engine.facts
    if options.keep_ratio is None:
        return facts.default_keep_ratio
    if not facts.is_stts and options.keep_ratio < 1.0:
        raise APIError(
            400,
            "the served model has no STTS pruning: stts.keep_ratio must be 1.0",
            param="stts.keep_ratio",
            code="stts_unsupported",
        )
    return options.keep_ratio


def _video_metadata(video: LoadedVideo) -> dict[str, Any]:
    return video.metadata


def _parts(content: Iterable[Any], where: str) -> list[Any]:
    """vLLM validates content parts lazily (an iterator): materialise them, so a malformed
    part is a 400 naming the message, not an error halfway through loading media."""
    try:
        return list(content)
    except ValidationError as exc:
        raise APIError(
            400, f"malformed content part at `{where}`", param=where, code="invalid_request"
        ) from exc


def _url(part: dict[str, Any], key: str, where: str, *, frames: bool = False) -> Any:
    """`{"url": ...}` (OpenAI) or a bare URL (vLLM's simple form); for videos also a list of
    frame image URLs."""
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if frames and isinstance(url, str) and url.startswith(FRAME_LIST_SCHEME):
        url = json.loads(url.removeprefix(FRAME_LIST_SCHEME))
    if isinstance(url, str) and url:
        return url
    if frames and isinstance(url, list) and url and all(isinstance(u, str) for u in url):
        return url
    raise APIError(400, f"`{where}.{key}.url` is missing or not a URL", param=f"{where}.{key}")


class _MessageParts:
    """One message's content parts -> template parts and media loaders, in prompt order. A run
    of image parts becomes one video when the frame options say `frames_as_video`."""

    def __init__(self, state: AppState, options: STTSOptions, keep: float) -> None:
        self.state = state
        self.options = options
        self.keep = keep
        self.fps = options.fps or state.settings.fps
        self.loaders: list[tuple[str, Coroutine[Any, Any, Any]]] = []

    def _frames(self, urls: list[str]) -> dict[str, str]:
        self.loaders.append(("video", self.state.media.frames_video(list(urls), fps=self.fps)))
        return {"type": "video"}

    def _video(self, url: str) -> dict[str, str]:
        options, settings = self.options, self.state.settings
        loader = self.state.media.video(
            url,
            fps=self.fps,
            num_frames=options.num_frames,
            max_frames=options.max_frames or settings.max_frames,
            keep_ratio=self.keep,
            test_time_scaling=options.test_time_scaling,
        )
        self.loaders.append(("video", loader))
        return {"type": "video"}

    def convert(self, parts: list[Any], where: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        frames: list[str] = []
        for j, part in enumerate([*parts, None]):  # None flushes a trailing frame run
            kind = part.get("type") if isinstance(part, dict) else None
            if frames and not (kind == "image_url" and self.options.frames_as_video):
                out.append(self._frames(frames))
                frames = []
            if part is None:
                break
            if isinstance(part, str):
                out.append({"type": "text", "text": part})
            elif kind in _TEXT_PARTS:
                out.append({"type": "text", "text": part.get(_TEXT_PARTS[kind]) or ""})
            elif kind == "image_url" and self.options.frames_as_video:
                frames.append(_url(part, kind, f"{where}.{j}"))
            elif kind == "image_url":
                url = _url(part, kind, f"{where}.{j}")
                self.loaders.append(("image", self.state.media.image(url)))
                out.append({"type": "image"})
            elif kind == "video_url":
                url = _url(part, kind, f"{where}.{j}", frames=True)
                out.append(self._frames(url) if isinstance(url, list) else self._video(url))
            else:
                raise APIError(
                    400,
                    f"content part type {kind!r} is not supported by this server "
                    f"(supported: {', '.join(_SUPPORTED_PARTS)})",
                    param=f"{where}.{j}.type",
                    code="unsupported_content",
                )
        return out


def _conversation_message(message: dict[str, Any], content: Any) -> dict[str, Any]:
    """The rest of a message as vLLM hands it to the chat template (`tool_calls` copied, since
    vLLM's post-processing parses their JSON arguments in place)."""
    # no content (an assistant turn that only called tools): empty, as vLLM renders it
    out: dict[str, Any] = {"role": message["role"], "content": "" if content is None else content}
    if message["role"] == "assistant" and message.get("tool_calls") is not None:
        out["tool_calls"] = [
            {**dict(call), "function": dict(call.get("function") or {})}
            for call in message["tool_calls"]
        ]
    if message["role"] == "tool":
        if message.get("tool_call_id") is not None:
            out["tool_call_id"] = message["tool_call_id"]
        if isinstance(content, list) and all(p.get("type") == "text" for p in content):
            out["content"] = "\n".join(p["text"] for p in content)
    for key in ("name", "reasoning"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    return out


def _close(loaders: list[tuple[str, Coroutine[Any, Any, Any]]]) -> None:
    for _, coroutine in loaders:
        coroutine.close()


async def load_chat(body: Any, state: AppState) -> LoadedChat:
    """The conversation with media placeholders, the loaded media and the STTS report."""
    options = resolve_video_options(body)
    keep = resolve_keep_ratio(options, state)
    limit = state.settings.max_media_per_message
    conversation: list[dict[str, Any]] = []
    loaders: list[tuple[str, Coroutine[Any, Any, Any]]] = []
    try:
        for index, message in enumerate(body.messages):
            content = message.get("content")
            where = f"messages.{index}.content"
            if content is not None and not isinstance(content, str):
                parts = _MessageParts(state, options, keep)
                content = parts.convert(_parts(content, where), where)
                loaders.extend(parts.loaders)
                if len(parts.loaders) > limit:
                    raise APIError(
                        400,
                        f"message {index} has {len(parts.loaders)} images/videos; at "
                        f"most {limit} per message",
                        param=where,
                        code="too_many_media",
                    )
            conversation.append(_conversation_message(message, content))
    except BaseException:
        _close(loaders)
        raise

    loaded = await asyncio.gather(*(coroutine for _, coroutine in loaders))
    kinds = [kind for kind, _ in loaders]
    images: list[Image.Image] = [m for k, m in zip(kinds, loaded, strict=True) if k == "image"]
    videos: list[LoadedVideo] = [m for k, m in zip(kinds, loaded, strict=True) if k == "video"]
    mm_data: dict[str, Any] = {}
    if images:
        mm_data["image"] = images
    if videos:
        mm_data["video"] = [(v.frames, _video_metadata(v)) for v in videos]
    processor_kwargs = {"stts_keep_ratio": keep} if state.engine.facts.is_stts and videos else {}
    return LoadedChat(conversation, mm_data, processor_kwargs, _report(videos, keep, state), videos)


def _report(videos: list[LoadedVideo], keep: float, state: AppState) -> STTSReport | None:
    if not videos:
        return None
    items = []
    for video in videos:
        grid, before, after = video_tokens(
            int(video.frames.shape[0]), video.plan.size, state.engine.facts.geometry, keep
        )
        items.append(
            VideoReport(
                frames_sampled=int(video.frames.shape[0]),
                duration_seconds=video.duration,
                grid_thw=grid,
                video_tokens_before=before,
                video_tokens_after=after,
                decode_cached=video.cache_hit,
            )
        )
    before = sum(v.video_tokens_before for v in items)
    after = sum(v.video_tokens_after for v in items)
    return STTSReport(
        keep_ratio=keep,
        test_time_scaling=any(v.plan.test_time_scaled for v in videos),
        videos=items,
        video_tokens_before=before,
        video_tokens_after=after,
        tokens_saved=before - after,
    )
