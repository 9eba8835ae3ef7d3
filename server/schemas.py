"""Pydantic models of every request and response body (OpenAI's shapes, plus `stts`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# === Errors === #


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# === Chat completion requests === #


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    """A video file (`data:` URL, `file-…` id, allowed http(s)/file URL), or a list of frame
    image URLs in time order (how many clients send videos)."""

    url: str | Annotated[list[str], Field(min_length=1)]


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class STTSOptions(BaseModel):
    """Our extension, sent through `extra_body={"stts": {...}}`."""

    model_config = ConfigDict(extra="forbid")

    keep_ratio: float | None = Field(None, gt=0.0, le=1.0)
    fps: float | None = Field(None, gt=0.0, le=60.0)
    num_frames: int | None = Field(None, ge=1, le=4096)
    max_frames: int | None = Field(None, ge=1, le=4096)
    test_time_scaling: bool | None = None
    frames_as_video: bool = Field(
        False, description="treat a message's run of image_url parts as the frames of one video"
    )


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=8)
    # vLLM's own extensions, as its OpenAI server accepts them
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    stts: STTSOptions | None = None


# === Chat completion responses === #


class VideoReport(BaseModel):
    frames_sampled: int
    duration_seconds: float | None
    grid_thw: tuple[int, int, int]
    video_tokens_before: int
    video_tokens_after: int
    decode_cached: bool


class STTSReport(BaseModel):
    """What pruning did for this request."""

    keep_ratio: float
    test_time_scaling: bool
    videos: list[VideoReport]
    video_tokens_before: int
    video_tokens_after: int
    tokens_saved: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    stts: STTSReport | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    stts: STTSReport | None = None


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
    status: Literal["ok", "starting", "unavailable", "engine_dead"]
