"""One frame plan from three ways of asking for it: our `stts` options, vLLM's per-request
`mm_processor_kwargs` (`fps`, `num_frames`, `max_frames`, `stts_keep_ratio`) and vLLM's
`media_io_kwargs` (`{"video": {"num_frames", "fps"}}`, lmms-eval's `pass_video_url` path).

A client written for `vllm serve` gets the frames it asked for here too. Where two sources set
the same knob to different values the request is refused (400 naming both), since either
choice would silently drop what the client said. Keys we cannot map onto the plan (e.g. the
processor's `max_pixels`: the server sizes frames itself) are refused rather than ignored.

Resolved once per request, by the chat service before admission; the media loader reads the
result from the request's context.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from server.chat_request import ChatRequest
from server.errors import APIError
from server.schemas import STTSOptions

# source knob -> our `STTSOptions` field
_PROCESSOR_KEYS = {
    "fps": "fps",
    "num_frames": "num_frames",
    "max_frames": "max_frames",
    "stts_keep_ratio": "keep_ratio",
}
_MEDIA_IO_VIDEO_KEYS = {"fps": "fps", "num_frames": "num_frames"}


def _sources(body: ChatRequest) -> list[tuple[str, str, Any]]:
    """(param path, our field, value) for every knob the request sets, in precedence order."""
    found: list[tuple[str, str, Any]] = []
    if body.stts is not None:
        for name in body.stts.model_fields_set:
            found.append((f"stts.{name}", name, getattr(body.stts, name)))
    for key, value in (body.mm_processor_kwargs or {}).items():
        if key not in _PROCESSOR_KEYS:
            raise APIError(
                400,
                f"mm_processor_kwargs.{key} is not supported by this server (frames are "
                f"sampled and sized by the server); supported: {sorted(_PROCESSOR_KEYS)}",
                param=f"mm_processor_kwargs.{key}",
                code="unsupported_parameter",
            )
        found.append((f"mm_processor_kwargs.{key}", _PROCESSOR_KEYS[key], value))
    for modality, kwargs in (body.media_io_kwargs or {}).items():
        if modality != "video":
            raise APIError(
                400,
                f"media_io_kwargs.{modality} is not supported (only media_io_kwargs.video)",
                param=f"media_io_kwargs.{modality}",
                code="unsupported_parameter",
            )
        for key, value in kwargs.items():
            if key not in _MEDIA_IO_VIDEO_KEYS:
                raise APIError(
                    400,
                    f"media_io_kwargs.video.{key} is not supported; supported: "
                    f"{sorted(_MEDIA_IO_VIDEO_KEYS)}",
                    param=f"media_io_kwargs.video.{key}",
                    code="unsupported_parameter",
                )
            found.append((f"media_io_kwargs.video.{key}", _MEDIA_IO_VIDEO_KEYS[key], value))
    return found


def resolve_video_options(body: ChatRequest, max_frames: int | None = None) -> STTSOptions:
    """The request's frame options, all sources merged; 400 on a bad value or a conflict.

    With the server's `max_frames`: a client's `num_frames` above it is refused (400 naming
    the limit: silently taking fewer frames would change the answer), a client's own
    `max_frames` above it is lowered to it (a bound is still honoured)."""
    chosen: dict[str, tuple[str, Any]] = {}
    for param, name, value in _sources(body):
        if name in chosen and chosen[name][1] != value:
            first = chosen[name][0]
            raise APIError(
                400,
                f"{param}={value!r} conflicts with {first}={chosen[name][1]!r}: both set the "
                f"video's {name}; give one of them (or the same value)",
                param=param,
                code="conflicting_parameters",
            )
        chosen.setdefault(name, (param, value))
    try:
        options = STTSOptions(**{name: value for name, (_, value) in chosen.items()})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error.get("loc") else ""
        param = chosen[name][0] if name in chosen else "stts"
        raise APIError(
            400, f"{error['msg']} at `{param}`", param=param, code="invalid_request"
        ) from exc
    if max_frames is None:
        return options
    if options.num_frames is not None and options.num_frames > max_frames:
        param = chosen["num_frames"][0]
        raise APIError(
            400,
            f"{param}={options.num_frames} exceeds this server's limit of {max_frames} frames "
            "per video",
            param=param,
            code="too_many_frames",
        )
    if options.max_frames is not None and options.max_frames > max_frames:
        options = options.model_copy(update={"max_frames": max_frames})
    return options
