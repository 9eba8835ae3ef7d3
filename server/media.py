"""From a message's media URL to frames the engine can take.

Sources: `data:` URLs (base64), `file-…` ids of uploads, `file://` under a configured media
root, and `http(s)://` only for allowlisted hosts that resolve to public addresses. Videos are
probed, planned (`stts_vllm.media.frames`), decoded in a worker thread, and cached by content digest
and plan, so repeated questions about one video skip decoding.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import hashlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

from server import metrics
from server.auth import SHARED_OWNER
from server.file_store import FileStore
from server.remote_media import fetch_remote
from server.settings import Settings
from stts_vllm.media.decode import DecodeBudget, DecodedVideo, VideoInfo, decode, probe
from stts_vllm.media.errors import MediaError
from stts_vllm.media.frames import FramePlan, frame_size, plan_video
from stts_vllm.media.geometry import VisionGeometry
from stts_vllm.media.sampling import FrameSampling
from stts_vllm.media.video import frames_metadata, sampled_fps

T = TypeVar("T")


@dataclass(frozen=True)
class MediaBytes:
    data: bytes | Path
    mime: str | None
    digest: str


@dataclass(frozen=True)
class LoadedVideo:
    frames: np.ndarray
    fps: float  # of the sampled frames, as the model's time axis sees them
    duration: float | None
    plan: FramePlan
    cache_hit: bool
    metadata: dict[str, Any]  # what vLLM's processor gets with the frames


class DecodedCache:
    """LRU of decoded frame stacks, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, DecodedVideo] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple) -> DecodedVideo | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, video: DecodedVideo) -> None:
        if key in self._items or video.frames.nbytes > self.max_bytes:
            return
        self._items[key] = video
        self._bytes += video.frames.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.frames.nbytes


def _parse_data_url(url: str, max_bytes: int) -> tuple[bytes, str]:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise MediaError("invalid_data_url", "malformed data URL (expected data:<mime>;base64,…)")
    mime, *params = header[5:].split(";")
    if "base64" not in params:
        raise MediaError("invalid_data_url", "data URLs must be base64-encoded")
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError("media_too_large", f"media exceeds the {max_bytes} byte limit", 413)
    try:
        data = binascii.a2b_base64(payload.strip())
    except binascii.Error as exc:
        raise MediaError("invalid_base64", f"data URL payload is not valid base64 ({exc})") from exc
    if not data:
        raise MediaError("empty_media", "data URL carries no data")
    return data, mime.strip().lower()


@dataclass(frozen=True)
class PreparedImage:
    """An image whose header was read (size checked) but whose pixels are not decoded yet."""

    data: bytes | Path
    width: int
    height: int


@dataclass(frozen=True)
class PreparedFrames:
    """A video sent as frame images, headers read and planned, no pixel decoded yet."""

    images: list[PreparedImage]
    plan: FramePlan
    fps: float


@dataclass(frozen=True)
class PreparedVideo:
    """A video probed and planned, not decoded: what the request's budget is checked on."""

    media: MediaBytes
    info: VideoInfo
    plan: FramePlan
    fps: float


class MediaLoader:
    """Loads a request's media in two phases so its whole cost is known before the costly
    part: `prepare_*` (fetch, probe, plan: bounded, cheap) for every item, then `load_*`
    (decode). Blocking work runs on a bounded pool of its own, never on the event loop or the
    default executor; a cancelled load (the client left, the deadline passed) stops its
    decoder at the next frame."""

    def __init__(self, settings: Settings, files: FileStore, geometry: VisionGeometry) -> None:
        self.settings = settings
        self.files = files
        self.geometry = geometry
        self.cache = DecodedCache(settings.decoded_cache_bytes)
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, settings.decode_workers), thread_name_prefix="stts-decode"
        )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _budgeted(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args, budget)` on the pool, stopped at its next frame if we are cancelled."""
        cancelled = threading.Event()
        budget = DecodeBudget(
            deadline=time.monotonic() + self.settings.decode_timeout_seconds,
            max_frames=self.settings.max_decoded_frames,
            cancelled=cancelled,
        )
        try:
            return await self._run(functools.partial(fn, *args, budget=budget))
        except BaseException:
            cancelled.set()
            raise

    # -- sources --

    async def fetch(self, url: str, owner: str = SHARED_OWNER) -> MediaBytes:
        limit = self.settings.max_video_bytes
        if url.startswith("data:"):
            return await self._run(_data_url_media, url, limit)
        if url.startswith("file-"):
            stored = await self.files.locate(url, owner=owner)
            return MediaBytes(stored.path, None, stored.sha256)
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return await self._local_file(Path(unquote(parsed.path)))
        if parsed.scheme in ("http", "https"):
            return await self._remote(url)
        raise MediaError(
            "unsupported_url",
            "media URL must be a data: URL, an uploaded file id (file-…), "
            "or an allowed http(s)/file URL",
        )

    async def _local_file(self, path: Path) -> MediaBytes:
        root = self.settings.media_root
        if root is None:
            raise MediaError("forbidden_url", "file:// URLs are disabled (no media root set)")
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
            raise MediaError("forbidden_url", "file:// URL is outside the media root or missing")
        if resolved.stat().st_size > self.settings.max_video_bytes:
            raise MediaError(
                "media_too_large", f"media exceeds {self.settings.max_video_bytes} bytes", 413
            )
        return await self._run(_file_media, resolved)

    async def _remote(self, url: str) -> MediaBytes:
        """One DNS lookup, every address checked, the connection made to a checked address,
        all within one total deadline (`server.remote_media`)."""
        settings = self.settings
        remote = await fetch_remote(
            url,
            allowlist=settings.remote_media_allowlist,
            max_bytes=settings.max_video_bytes,
            deadline_seconds=settings.remote_timeout_seconds,
        )
        return MediaBytes(remote.data, remote.mime, await self._run(_sha256, remote.data))

    # -- images --

    async def prepare_image(self, url: str, owner: str = SHARED_OWNER) -> PreparedImage:
        media = await self.fetch(url, owner)
        if media.mime is not None and not media.mime.startswith("image/"):
            raise MediaError("wrong_mime_type", f"image_url carries {media.mime!r}, not an image")
        return await self._run(self._image_header, media.data)

    def _image_header(self, data: bytes | Path) -> PreparedImage:
        """Size from the header only: nothing is decoded before the whole request's budget
        is checked."""
        with _open_image(data) as image:
            width, height = image.size
        if width * height > self.settings.max_image_pixels:
            raise MediaError(
                "media_too_large",
                f"image of {width}x{height} exceeds the {self.settings.max_image_pixels} "
                "pixel limit",
            )
        return PreparedImage(data, width, height)

    async def load_image(self, prepared: PreparedImage) -> Image.Image:
        return await self._run(_decode_image, prepared.data)

    # -- videos --

    def _check_limits(self, info: VideoInfo) -> None:
        if info.width * info.height > self.settings.max_video_pixels:
            raise MediaError(
                "media_too_large",
                f"video of {info.width}x{info.height} exceeds "
                f"the {self.settings.max_video_pixels} pixel limit",
            )
        if info.duration > self.settings.max_video_seconds:
            raise MediaError(
                "media_too_long",
                f"video of {info.duration:.0f} s exceeds the "
                f"{self.settings.max_video_seconds:.0f} s limit",
            )

    def _plan(
        self,
        info: VideoInfo,
        *,
        fps: float,
        num_frames: int | None,
        max_frames: int,
        keep_ratio: float,
        test_time_scaling: bool,
    ) -> FramePlan:
        sampling = FrameSampling(
            fps=fps, min_frames=self.settings.min_frames, max_frames=max_frames
        )
        return plan_video(
            info,
            self.geometry,
            sampling,
            num_frames=num_frames,
            keep_ratio=keep_ratio,
            test_time_scaling=test_time_scaling,
        )

    async def prepare_video(
        self,
        url: str,
        *,
        owner: str = SHARED_OWNER,
        fps: float,
        num_frames: int | None,
        max_frames: int,
        keep_ratio: float,
        test_time_scaling: bool | None,
    ) -> PreparedVideo:
        """Fetch, probe (one frame) and plan. `test_time_scaling=None`: on for long videos."""
        media = await self.fetch(url, owner)
        if media.mime is not None and not (
            media.mime.startswith("video/") or media.mime in ("image/gif",)
        ):
            raise MediaError("wrong_mime_type", f"video_url carries {media.mime!r}, not a video")
        info = await self._budgeted(probe, media.data)
        metrics.FRAMES_DECODED.inc(info.probe_frames)
        self._check_limits(info)
        if test_time_scaling is None:
            test_time_scaling = (
                self.settings.test_time_scaling
                and info.duration >= self.settings.long_video_seconds
            )
        plan = self._plan(
            info,
            fps=fps,
            num_frames=num_frames,
            max_frames=max_frames,
            keep_ratio=keep_ratio,
            test_time_scaling=test_time_scaling,
        )
        return PreparedVideo(media, info, plan, fps)

    async def load_video(self, prepared: PreparedVideo) -> LoadedVideo:
        """Decode the planned frames (or take them from the cache)."""
        media, info, plan = prepared.media, prepared.info, prepared.plan
        key = (media.digest, tuple(round(t, 4) for t in plan.times), plan.size)
        decoded = self.cache.get(key)
        hit = decoded is not None
        if decoded is None:
            start = time.perf_counter()
            decoded = await self._budgeted(decode, media.data, plan.times, plan.size, info)
            metrics.DECODE_SECONDS.observe(time.perf_counter() - start)
            metrics.FRAMES_DECODED.inc(decoded.decoded_frames)
            self.cache.put(key, decoded)
        metrics.DECODES.labels(cache="hit" if hit else "miss").inc()
        fps_sampled = sampled_fps(plan, prepared.fps)
        metadata = frames_metadata(decoded.times, fps_sampled, info.duration, self.geometry)
        return LoadedVideo(decoded.frames, fps_sampled, info.duration, plan, hit, metadata)

    async def prepare_frames(
        self,
        urls: list[str],
        owner: str = SHARED_OWNER,
        *,
        fps: float,
        times: Sequence[float] | None = None,
        num_frames: int | None = None,
    ) -> PreparedFrames:
        """A video sent as a run of frame images (time order), e.g. lmms-eval's clients:
        every frame's header read (a bad one anywhere is the client's error), then, where the
        request asks for fewer frames (`num_frames`, its `max_frames`), that many picked
        uniformly as a video's frame plan picks them, each scaled to the first's size. The
        frames are at the client's `times` where it gave them (their mean rate is the video's
        fps), else spaced at `fps`."""
        images = [await self.prepare_image(url, owner) for url in urls]
        frame_times = list(times) if times is not None else [i / fps for i in range(len(images))]
        picking = num_frames is not None and num_frames < len(images)
        if picking:
            count = len(images)
            picked = [(2 * i + 1) * count // (2 * num_frames) for i in range(num_frames)]
            images = [images[k] for k in picked]
            frame_times = [frame_times[k] for k in picked]
        if (times is not None or picking) and frame_times[-1] > frame_times[0]:
            fps = (len(frame_times) - 1) / (frame_times[-1] - frame_times[0])
        first = images[0]
        try:
            size = frame_size(first.height, first.width, self.geometry, len(images))
        except ValueError as exc:  # e.g. a 1x250 image: no patch grid fits
            raise MediaError("invalid_image", f"frame image cannot be used: {exc}") from exc
        plan = FramePlan(times=frame_times, size=size, test_time_scaled=False)
        return PreparedFrames(images, plan, fps)

    async def load_frames(self, prepared: PreparedFrames) -> LoadedVideo:
        plan, fps = prepared.plan, prepared.fps
        frames = await self._run(_frame_stack, [i.data for i in prepared.images], plan.size)
        metrics.DECODES.labels(cache="miss").inc()
        duration = plan.times[-1] + 1 / fps  # the last frame lasts one frame interval
        metadata = frames_metadata(plan.times, fps, duration, self.geometry)
        return LoadedVideo(frames, fps, duration, plan, False, metadata)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_url_media(url: str, limit: int) -> MediaBytes:
    data, mime = _parse_data_url(url, limit)
    return MediaBytes(data, mime, _sha256(data))


def _file_media(path: Path) -> MediaBytes:
    data = path.read_bytes()
    return MediaBytes(data, None, _sha256(data))


@contextmanager
def _open_image(data: bytes | Path) -> Iterator[Image.Image]:
    """PIL's lazy open (header only until pixels are asked for); any failure, then or while
    decoding, is the client's unreadable image."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            yield image
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise MediaError("invalid_image", f"not a readable image ({exc})") from exc


def _decode_image(data: bytes | Path) -> Image.Image:
    with _open_image(data) as image:
        return image.convert("RGB")


def _frame_stack(images: list[bytes | Path], size: tuple[int, int]) -> np.ndarray:
    frames = []
    for data in images:
        image = _decode_image(data)
        frames.append(np.asarray(image.resize((size[1], size[0]), Image.Resampling.BICUBIC)))
    return np.stack(frames)
