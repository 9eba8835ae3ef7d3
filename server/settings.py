"""Server configuration: CLI flags (`stts-serve --model DIR`) and `STTS_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, CliImplicitFlag, SettingsConfigDict

from stts_vllm.media.sampling import FrameSampling

DEMO_MODEL = Path("artifacts/demo-stts")


class Settings(BaseSettings):
    """Every knob of the server; defaults suit the demo checkpoint on a CPU box."""

    model_config = SettingsConfigDict(env_prefix="STTS_", cli_kebab_case=True, extra="ignore")

    # -- model and engine --
    model: Path = Field(DEMO_MODEL, description="STTS (or stock) Qwen2.5-VL checkpoint directory")
    served_model_name: str = "stts-demo"
    dtype: str = "float32"
    max_model_len: int = 16384
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    limit_videos_per_prompt: int = 2
    limit_images_per_prompt: int = 8
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="any other vLLM engine argument, as JSON, e.g. "
        '\'{"data_parallel_size": 2, "kv_cache_dtype": "fp8"}\' (names as in vllm.EngineArgs)',
    )
    encoder_patch_budget: int | None = Field(
        None,
        ge=1,
        description="most unpruned video patches one call of the pruned vision tower takes "
        "(videos of a step beyond it go in further calls); default: the encoder call the "
        "engine profiled at start-up, which it reserved memory for",
    )
    encoder_timing: bool = Field(
        False,
        description="time every pruned-tower call on a GPU for stts_encoder_seconds_total "
        "(a device sync per call; always timed on the CPU)",
    )

    # -- HTTP --
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>`")
    api_keys: list[str] = Field(
        default_factory=list,
        description="several accepted keys, each with its own namespace of uploaded files "
        "(a key lists, reads and deletes only its own files); may be combined with api_key, "
        "whose files are its own namespace too",
    )
    max_in_flight: int = Field(64, description="requests admitted at once; more get 429")
    retry_after_seconds: int = 1
    exit_on_engine_death: bool = Field(
        True,
        description="stop the process (exit status 1) when the engine dies, so Docker or "
        "Kubernetes restarts the server; false keeps it up answering 503",
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024,
        description="largest JSON request body (413 while it streams in); uploads are bounded "
        "by max_video_bytes instead",
    )
    request_timeout_seconds: float = Field(
        900.0, description="whole-request deadline (media loading and generation); 504 after"
    )
    drain_seconds: float = Field(
        30.0,
        description="on SIGTERM: new requests get 503 while in-flight ones (streams too) get "
        "this long to finish; keep Kubernetes' terminationGracePeriodSeconds above it",
    )

    # -- OpenAI API (the same knobs as `vllm serve`) --
    tool_call_parser: str | None = Field(
        None, description="vLLM tool parser for tool calls in the output, e.g. hermes"
    )
    enable_auto_tool_choice: CliImplicitFlag[bool] = Field(  # a bare flag, as in vLLM
        False, description='tool_choice "auto": the model decides (needs --tool-call-parser)'
    )
    default_max_tokens: int = Field(
        1024,
        description="a request without max_tokens gets the rest of the context, at most this "
        "many tokens (0: no bound, as vLLM); the checkpoint's generation_config.json "
        "max_new_tokens, if set, comes first",
    )

    # -- media --
    max_video_bytes: int = 256 * 1024 * 1024
    max_video_seconds: float = 3 * 3600.0
    max_video_pixels: int = 8192 * 8192
    max_media_per_message: int = 2
    max_image_pixels: int = Field(
        4096 * 4096, description="largest image (or frame-list frame), checked from its header"
    )
    decode_workers: int = Field(
        4, description="threads decoding videos and images (a bounded pool of their own)"
    )
    decode_timeout_seconds: float = Field(
        120.0, description="deadline for decoding one video (400 after, the work stopped)"
    )
    max_decoded_frames: int = Field(
        100_000,
        description="frames FFmpeg may decode for one video, sampled or skipped (400 after): "
        "bounds the cost of long or pathological files",
    )
    remote_media_allowlist: list[str] = Field(
        default_factory=list, description="hosts allowed in http(s) media URLs (empty: none)"
    )
    media_root: Path | None = Field(None, description="root for file:// media URLs (unset: none)")
    remote_timeout_seconds: float = Field(
        20.0, description="total deadline for fetching one remote media URL (connect to last byte)"
    )

    # -- sampling and STTS --
    fps: float = FrameSampling.fps  # the defaults training samples with too
    min_frames: int = FrameSampling.min_frames
    max_frames: int = FrameSampling.max_frames
    frame_min_pixels: int | None = Field(None, description="default: the model's processor")
    frame_max_pixels: int | None = Field(None, description="default: the model's processor")
    test_time_scaling: bool = Field(True, description="spend pruning savings on more frames")
    frames_as_video: Literal["off", "auto", "always"] = Field(
        "auto",
        description="a message's run of image parts (timestamp text parts between them "
        "allowed) is one video: auto, a run of at least --frames-as-video-min-images; "
        "stts.frames_as_video per request wins",
    )
    frames_as_video_min_images: int = Field(4, ge=1, description="the shortest run auto reads")
    keep_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="keep ratio of a request that names none (default: the checkpoint's "
        "stts.keep_ratio); stts.keep_ratio and mm_processor_kwargs.stts_keep_ratio win",
    )
    long_video_seconds: float = Field(
        30.0, description="test-time scaling applies by default to videos at least this long"
    )

    # -- uploaded files --
    files_dir: Path = Path("artifacts/files")
    max_files: int = 256
    max_files_bytes: int = 8 * 1024 * 1024 * 1024
    decoded_cache_bytes: int = 1024 * 1024 * 1024
