"""OpenAI chat messages -> a rendered prompt plus the media the engine needs, and a report of
what STTS did. All media of a request load concurrently."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from server.errors import APIError
from server.frame_sampling import video_tokens
from server.media import LoadedVideo
from server.schemas import (
    ChatCompletionRequest,
    ImagePart,
    STTSOptions,
    STTSReport,
    TextPart,
    VideoPart,
    VideoReport,
)
from server.state import AppState


@dataclass
class EngineInputs:
    prompt: dict[str, Any]
    report: STTSReport | None
    videos: list[LoadedVideo] = field(default_factory=list)


def _resolve_keep_ratio(options: STTSOptions, state: AppState) -> float:
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


def _message_parts(
    content: list[Any], options: STTSOptions, state: AppState, *, keep: float
) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """HF chat parts (media as placeholders) and the media loaders, in prompt order. A run of
    image parts becomes one video when `stts.frames_as_video` is set."""
    settings = state.settings
    fps = options.fps or settings.fps
    parts: list[dict[str, Any]] = []
    loaders: list[tuple[str, Any]] = []
    frames: list[str] = []
    for part in [*content, None]:  # None flushes a trailing frame run
        if frames and not (isinstance(part, ImagePart) and options.frames_as_video):
            loaders.append(("video", state.media.frames_video(list(frames), fps=fps)))
            parts.append({"type": "video"})
            frames.clear()
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart) and options.frames_as_video:
            frames.append(part.image_url.url)
        elif isinstance(part, ImagePart):
            loaders.append(("image", state.media.image(part.image_url.url)))
            parts.append({"type": "image"})
        elif isinstance(part, VideoPart):
            url = part.video_url.url
            loader = (
                state.media.frames_video(url, fps=fps)
                if isinstance(url, list)
                else state.media.video(
                    url,
                    fps=fps,
                    num_frames=options.num_frames,
                    max_frames=options.max_frames or settings.max_frames,
                    keep_ratio=keep,
                    test_time_scaling=options.test_time_scaling,
                )
            )
            loaders.append(("video", loader))
            parts.append({"type": "video"})
    return parts, loaders


async def build_engine_inputs(body: ChatCompletionRequest, state: AppState) -> EngineInputs:
    options = body.stts or STTSOptions()
    keep = _resolve_keep_ratio(options, state)
    limit = state.settings.max_media_per_message
    hf_messages: list[dict[str, Any]] = []
    loaders: list[tuple[str, Any]] = []
    for index, message in enumerate(body.messages):
        if message.content is None or isinstance(message.content, str):
            hf_messages.append({"role": message.role, "content": message.content or ""})
            continue
        parts, message_loaders = _message_parts(message.content, options, state, keep=keep)
        loaders.extend(message_loaders)
        if len(message_loaders) > limit:
            for _, coroutine in loaders:
                coroutine.close()
            raise APIError(
                400,
                f"message {index} has {len(message_loaders)} images/videos; at "
                f"most {limit} per message",
                param=f"messages.{index}.content",
                code="too_many_media",
            )
        hf_messages.append({"role": message.role, "content": parts})

    loaded = await asyncio.gather(*(coroutine for _, coroutine in loaders))
    kinds = [kind for kind, _ in loaders]
    images: list[Image.Image] = [m for k, m in zip(kinds, loaded, strict=True) if k == "image"]
    videos: list[LoadedVideo] = [m for k, m in zip(kinds, loaded, strict=True) if k == "video"]

    prompt: dict[str, Any] = {"prompt": state.engine.render(hf_messages)}
    mm_data: dict[str, Any] = {}
    if images:
        mm_data["image"] = images
    if videos:
        mm_data["video"] = [(v.frames, _video_metadata(v)) for v in videos]
    if mm_data:
        prompt["multi_modal_data"] = mm_data
    if state.engine.facts.is_stts and videos:
        prompt["mm_processor_kwargs"] = {"stts_keep_ratio": keep}
    return EngineInputs(prompt=prompt, report=_report(videos, keep, state), videos=videos)


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
