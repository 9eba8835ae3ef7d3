"""Pydantic models of our request and response bodies: errors, the `stts` extension and its
report, files, models, health. The chat completion request and response are vLLM's own
(`server.chat_request`, `server.vllm_compat`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# === Errors === #


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# === Chat completion: our `stts` extension (the rest is vLLM's, server.chat_request) === #


class STTSOptions(BaseModel):
    """Our extension, sent through `extra_body={"stts": {...}}`."""

    model_config = ConfigDict(extra="forbid")

    keep_ratio: float | None = Field(None, gt=0.0, le=1.0)
    fps: float | None = Field(None, gt=0.0, le=60.0)
    num_frames: int | None = Field(None, ge=1, le=4096)
    max_frames: int | None = Field(None, ge=1, le=4096)
    test_time_scaling: bool | None = None
    frames_as_video: bool | None = Field(
        None,
        description="a message's run of image_url parts (and their timestamp text parts) is "
        "one video: true always, false never; default: the server's --frames-as-video",
    )


# === The `stts` report, added to chat completion responses === #


class VideoReport(BaseModel):
    frames_sampled: int
    duration_seconds: float | None
    grid_thw: tuple[int, int, int]
    video_tokens_before: int
    video_tokens_after: int
    decode_cached: bool
    # image parts read as this video's frames (`--frames-as-video`); 0 for a video
    frames_collapsed: int = 0


class STTSReport(BaseModel):
    """What pruning did for this request."""

    keep_ratio: float
    test_time_scaling: bool
    videos: list[VideoReport]
    video_tokens_before: int
    video_tokens_after: int
    tokens_saved: int


# === Files and models === #


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stts-vllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "starting", "unavailable", "engine_dead", "draining"]
