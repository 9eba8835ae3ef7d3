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
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image
from pydantic import ValidationError

from server.chat_request import FRAME_LIST_SCHEME, TEXT_PARTS, ChatRequest, LoadedChat
from server.errors import APIError
from server.frame_runs import FramesAsVideo, frame_runs
from server.media import LoadedVideo, PreparedFrames, PreparedImage, PreparedVideo
from server.schemas import STTSOptions, STTSReport, VideoReport
from server.settings import Settings
from server.state import AppState
from stts_vllm.media.errors import MediaError
from stts_vllm.media.frames import FramePlan, video_tokens

T = TypeVar("T")

_SUPPORTED_PARTS = sorted([*TEXT_PARTS, "image_url", "video_url"])


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


@dataclass
class _MediaItem:
    """One image or video of the request, in prompt order: first its source, then (phase 1)
    what its header or probe said, then (phase 2) the decoded media."""

    kind: str  # "image" | "video"
    url: str | None = None  # an image, or a video file
    frame_urls: list[str] | None = None  # a video sent as frame images
    frame_times: tuple[float, ...] | None = None  # their times, where the client gave them
    collapsed: int = 0  # image parts read as this video's frames (`--frames-as-video`)
    prepared: PreparedImage | PreparedFrames | PreparedVideo | None = None

    @property
    def plan(self) -> FramePlan | None:
        """A video's frame plan, once prepared (images have none)."""
        return getattr(self.prepared, "plan", None)


class _MessageParts:
    """One message's content parts -> template parts and media items, in prompt order. A run
    of image parts (with their timestamp parts) becomes one video where the frames-as-video
    policy says so (`server.frame_runs`)."""

    def __init__(self, policy: FramesAsVideo, min_images: int) -> None:
        self.policy = policy
        self.min_images = min_images
        self.items: list[_MediaItem] = []

    def _add(self, item: _MediaItem) -> dict[str, str]:
        self.items.append(item)
        return {"type": item.kind}

    def convert(self, parts: list[Any], where: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        runs = {run.start: run for run in frame_runs(parts, self.policy, self.min_images, where)}
        j = 0
        while j < len(parts):
            run = runs.get(j)
            if run is not None:
                urls = [_url(parts[k], "image_url", f"{where}.{k}") for k in run.images]
                item = _MediaItem(
                    "video", frame_urls=urls, frame_times=run.times, collapsed=len(urls)
                )
                out.append(self._add(item))
                j = run.stop
                continue
            part = parts[j]
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, str):
                out.append({"type": "text", "text": part})
            elif kind in TEXT_PARTS:
                out.append({"type": "text", "text": part.get(TEXT_PARTS[kind]) or ""})
            elif kind == "image_url":
                out.append(self._add(_MediaItem("image", url=_url(part, kind, f"{where}.{j}"))))
            elif kind == "video_url":
                url = _url(part, kind, f"{where}.{j}", frames=True)
                if isinstance(url, list):
                    out.append(self._add(_MediaItem("video", frame_urls=url)))
                else:
                    out.append(self._add(_MediaItem("video", url=url)))
            else:
                raise APIError(
                    400,
                    f"content part type {kind!r} is not supported by this server "
                    f"(supported: {', '.join(_SUPPORTED_PARTS)})",
                    param=f"{where}.{j}.type",
                    code="unsupported_content",
                )
            j += 1
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


async def _all(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest (their decoders stop) and is
    raised as itself, not as an exception group."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as group_error:
        errors = group_error.exceptions
        raise next((e for e in errors if isinstance(e, APIError | MediaError)), errors[0]) from None
    return [task.result() for task in tasks]


def _check_counts(items: list[_MediaItem], settings: Settings) -> None:
    """The request's media count, before anything is fetched."""
    for kind, limit, name in (
        ("video", settings.limit_videos_per_prompt, "limit_videos_per_prompt"),
        ("image", settings.limit_images_per_prompt, "limit_images_per_prompt"),
    ):
        count = sum(item.kind == kind for item in items)
        if count > limit:
            raise APIError(
                400,
                f"the request has {count} {kind}s; this server takes at most {limit} per "
                f"request ({name})",
                param="messages",
                code="too_many_media",
            )
    for item in items:
        if item.frame_urls is not None and len(item.frame_urls) > settings.max_frames:
            raise APIError(
                400,
                f"a video of {len(item.frame_urls)} frame images exceeds this server's limit "
                f"of {settings.max_frames} frames per video (--max-frames, STTS_MAX_FRAMES)",
                param="messages",
                code="too_many_frames",
            )


class _Loader:
    """Phase 1 (`prepare`: fetch, header/probe, plan) and phase 2 (`load`: decode) of one
    request's media, with the request's options."""

    def __init__(self, state: AppState, options: STTSOptions, keep: float, owner: str) -> None:
        self.media = state.media
        self.settings = state.settings
        self.options = options
        self.keep = keep
        self.owner = owner
        self.fps = options.fps or state.settings.fps

    async def prepare(self, item: _MediaItem) -> None:
        media = self.media
        if item.frame_urls is not None:
            options = self.options
            asked = [n for n in (options.num_frames, options.max_frames) if n is not None]
            item.prepared = await media.prepare_frames(
                item.frame_urls,
                self.owner,
                fps=self.fps,
                times=item.frame_times,
                num_frames=min(asked, default=None),
            )
            return
        assert item.url is not None  # an image or a video file: `_MessageParts` set its URL
        if item.kind == "image":
            item.prepared = await media.prepare_image(item.url, self.owner)
        else:
            options = self.options
            item.prepared = await media.prepare_video(
                item.url,
                owner=self.owner,
                fps=self.fps,
                num_frames=options.num_frames,
                max_frames=options.max_frames or self.settings.max_frames,
                keep_ratio=self.keep,
                test_time_scaling=options.test_time_scaling,
            )

    async def load(self, item: _MediaItem) -> Image.Image | LoadedVideo:
        prepared = item.prepared
        if isinstance(prepared, PreparedImage):
            return await self.media.load_image(prepared)
        if isinstance(prepared, PreparedFrames):
            return await self.media.load_frames(prepared)
        assert isinstance(prepared, PreparedVideo), "load follows prepare"
        return await self.media.load_video(prepared)


def _check_video_tokens(items: list[_MediaItem], keep: float, state: AppState) -> None:
    """The planned videos' tokens after pruning, against the context, before any decoding:
    a request that cannot fit is refused while it is still cheap."""
    geometry = state.engine.facts.geometry
    total = 0
    for item in items:
        if item.plan is not None:
            total += video_tokens(item.plan.num_frames, item.plan.size, geometry, keep)[2]
    limit = state.settings.max_model_len
    if total > limit:
        raise APIError(
            400,
            f"the request's videos need {total} tokens after pruning, more than the model's "
            f"context of {limit} (max_model_len); ask for fewer frames (stts.num_frames / "
            "stts.max_frames) or fewer videos",
            param="messages",
            code="context_length_exceeded",
        )


async def load_chat(body: ChatRequest, state: AppState) -> LoadedChat:
    """The conversation with media placeholders, the loaded media and the STTS report, with
    the frame options the route resolved (`body.context`).

    The whole request is admitted before its costly part: media counted before any fetch,
    every item fetched and probed (one frame each) and its token cost checked before any
    video is decoded."""
    options = body.context.video_options
    keep = resolve_keep_ratio(options, state)
    limit = state.settings.max_media_per_message
    policy: FramesAsVideo = state.settings.frames_as_video
    if options.frames_as_video is not None:  # the request's own choice wins
        policy = "always" if options.frames_as_video else "off"
    conversation: list[dict[str, Any]] = []
    items: list[_MediaItem] = []
    for index, message in enumerate(body.messages):
        content = message.get("content")
        where = f"messages.{index}.content"
        if content is not None and not isinstance(content, str):
            parts = _MessageParts(policy, state.settings.frames_as_video_min_images)
            content = parts.convert(_parts(content, where), where)
            if len(parts.items) > limit:
                raise APIError(
                    400,
                    f"message {index} has {len(parts.items)} images/videos; at most {limit} "
                    "per message (the server's --max-media-per-message, "
                    "STTS_MAX_MEDIA_PER_MESSAGE); a video's frames sent as image parts are one "
                    'video with "stts": {"frames_as_video": true}',
                    param=where,
                    code="too_many_media",
                )
            items.extend(parts.items)
        conversation.append(_conversation_message(message, content))
    _check_counts(items, state.settings)

    loader = _Loader(state, options, keep, body.context.owner)
    await _all([loader.prepare(item) for item in items])
    _check_video_tokens(items, keep, state)
    loaded = await _all([loader.load(item) for item in items])

    images = [m for m in loaded if isinstance(m, Image.Image)]
    videos = [m for m in loaded if isinstance(m, LoadedVideo)]
    collapsed = [item.collapsed for item in items if item.kind == "video"]  # `videos`' order
    mm_data: dict[str, Any] = {}
    if images:
        mm_data["image"] = images
    if videos:
        mm_data["video"] = [(v.frames, _video_metadata(v)) for v in videos]
    processor_kwargs = {"stts_keep_ratio": keep} if state.engine.facts.is_stts and videos else {}
    report = _report(videos, collapsed, keep, state)
    return LoadedChat(conversation, mm_data, processor_kwargs, report)


def _report(
    videos: list[LoadedVideo], collapsed: list[int], keep: float, state: AppState
) -> STTSReport | None:
    if not videos:
        return None
    items = []
    for video, image_parts in zip(videos, collapsed, strict=True):
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
                frames_collapsed=image_parts,
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
