"""Uploaded files: a bounded, content-addressed, per-owner store on disk.

A file's id derives from its SHA-256, so uploading the same video twice costs nothing and
its decoded frames (and vLLM's encoder cache) are shared by every question about it.

Every caller owns a namespace (`server.state.OwnerDep`): it lists, gets, deletes and uses only
its own files, and another owner's id is a 404 exactly like an unknown one. Content is stored
once however many namespaces hold it. Layout under `root`:

    blobs/<file id>.bin            the bytes, shared by every namespace that holds them
    owners/<owner>/<file id>.json  one namespace's record of a file (FileObject + sha256)
    tmp/                           uploads being spooled and records being written

Crash safety: blobs and records only ever appear by `os.replace` of a fully written, fsynced
temp file (then the directory is fsynced), so a record is never truncated. A blob is placed
before its record and a record removed before its blob, so a crash leaves at worst a blob no
record names or a temp file; start-up (the constructor) removes both, drops unreadable records
with a warning, and moves the old flat layout (`root/file-*.json` + `.bin`) into the shared
namespace. A record whose blob was lost anyway is repaired by uploading the same bytes again.

One server process owns `root`: the index of records lives in memory (built at start-up), so
`get` and `list` touch no disk, and every change is serialized by one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fastapi import UploadFile
from pydantic import ValidationError

from server.auth import SHARED_OWNER
from server.schemas import FileObject
from stts_vllm.media.errors import MediaError

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024


_FILE_ID = re.compile(r"file-[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def file_id(digest: str) -> str:
    return f"file-{digest[:32]}"


@dataclass(frozen=True)
class StoredFile:
    """One namespace's file: its record, and the content that `MediaLoader` reads."""

    record: FileObject
    sha256: str
    path: Path


@dataclass(frozen=True)
class _Spooled:
    part: Path
    sha256: str
    size: int


def _intact(stored: StoredFile) -> bool:
    """Size, not digest: the id is the digest, and re-hashing a video on every use costs a
    full read; what goes wrong on disk (lost, truncated) changes the size."""
    try:
        return stored.path.stat().st_size == stored.record.bytes
    except FileNotFoundError:
        return False


def _not_found(fid: str) -> MediaError:
    return MediaError("file_not_found", f"no file with id {fid!r}", status=404)


def _fsync_dir(path: Path) -> None:
    """Makes a rename or unlink in `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(tmp_dir: Path, dest: Path, data: bytes) -> None:
    """`dest` holds either its old content or all of `data`, even across a crash."""
    fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, dest)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _absorb(handle: IO[bytes], digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    handle.write(chunk)


def _seal(handle: IO[bytes]) -> None:
    """Data on disk before the part is renamed into place, so a crash cannot leave a blob of
    the right name but truncated content."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _discard(handle: IO[bytes], part: Path) -> None:
    with contextlib.suppress(OSError):
        handle.close()
    part.unlink(missing_ok=True)


def _remove(path: Path, why: str) -> None:
    logger.warning("file store: removing %s (%s)", path, why)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _parse_record(path: Path) -> tuple[FileObject, str]:
    """A record and its sha256; ValueError (or OSError) when it is not one this store wrote."""
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    sha256 = data.pop("sha256", None)
    record = FileObject.model_validate(data)
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError("no valid sha256")
    if record.id != path.stem or record.id != file_id(sha256):
        raise ValueError("id does not match its name or content digest")
    return record, sha256


def _record_bytes(record: FileObject, sha256: str) -> bytes:
    return json.dumps(record.model_dump() | {"sha256": sha256}).encode()


class FileStore:
    """The store, with limits that are global: `max_files` records and `max_bytes` bytes over
    all namespaces together, because they protect the disk, not a fair share. Every record is
    charged its full size even when another namespace holds the same content, so usage
    (and hence a 429) never depends on what other owners uploaded, only on how much.
    """

    def __init__(self, root: Path, *, max_files: int, max_bytes: int, max_file_bytes: int) -> None:
        """Opens (and recovers) the store; blocking, so call it before serving."""
        self.root = root
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self._blobs = root / "blobs"
        self._owners_dir = root / "owners"
        self._tmp = root / "tmp"
        self._lock = asyncio.Lock()
        self._index: dict[str, dict[str, StoredFile]] = {}
        for path in (root, self._blobs, self._owners_dir, self._tmp):
            path.mkdir(parents=True, exist_ok=True)
        self._recover()

    # -- start-up --

    def _recover(self) -> None:
        for part in [*self._tmp.iterdir(), *self.root.glob("*.part")]:
            _remove(part, "temp file left by an interrupted upload or write")
        self._migrate_flat_layout()
        for owner_dir in sorted(self._owners_dir.iterdir()):
            if owner_dir.is_dir() and _OWNER.fullmatch(owner_dir.name):
                self._load_owner(owner_dir)
            else:
                logger.warning("file store: ignoring %s (not a namespace)", owner_dir)
        referenced = {fid for files in self._index.values() for fid in files}
        for blob in self._blobs.glob("*.bin"):
            if blob.stem not in referenced:
                _remove(blob, "content no record refers to")
        for files in self._index.values():
            for stored in files.values():
                if not _intact(stored):
                    logger.warning(
                        "file store: the content of %s is missing or damaged; uploading it "
                        "again repairs it",
                        stored.record.id,
                    )

    def _migrate_flat_layout(self) -> None:
        """Files stored before namespaces (`root/file-*.json` + `.bin`) join the shared one.
        Blob first, record second, old record last: rerunnable after a crash at any step."""
        shared = self._owners_dir / SHARED_OWNER
        for old in sorted(self.root.glob("file-*.json")):
            try:
                record, sha256 = _parse_record(old)
            except (OSError, ValueError, ValidationError) as exc:
                _remove(old, f"unreadable record: {exc}")
                continue
            old_blob = self.root / f"{record.id}.bin"
            if old_blob.exists():
                os.replace(old_blob, self._blob_path(record.id))
                _fsync_dir(self._blobs)
            shared.mkdir(exist_ok=True)
            _write_atomic(self._tmp, shared / old.name, _record_bytes(record, sha256))
            old.unlink()
            logger.info("file store: moved %s into the %r namespace", record.id, SHARED_OWNER)
        for old_blob in self.root.glob("file-*.bin"):
            _remove(old_blob, "content no record refers to")

    def _load_owner(self, owner_dir: Path) -> None:
        loaded: list[tuple[float, StoredFile]] = []
        for path in owner_dir.glob("*.json"):
            try:
                record, sha256 = _parse_record(path)
                mtime = path.stat().st_mtime
            except (OSError, ValueError, ValidationError) as exc:
                _remove(path, f"unreadable record: {exc}")
                continue
            loaded.append((mtime, StoredFile(record, sha256, self._blob_path(record.id))))
        loaded.sort(key=lambda item: (item[1].record.created_at, item[0], item[1].record.id))
        self._index[owner_dir.name] = {stored.record.id: stored for _, stored in loaded}

    # -- paths --

    def _blob_path(self, fid: str) -> Path:
        return self._blobs / f"{fid}.bin"

    def _owner_dir(self, owner: str) -> Path:
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"invalid file namespace {owner!r}")
        return self._owners_dir / owner

    # -- reads (in memory: no disk I/O) --

    def _find(self, fid: str, owner: str) -> StoredFile:
        self._owner_dir(owner)
        stored = self._index.get(owner, {}).get(fid) if _FILE_ID.fullmatch(fid) else None
        if stored is None:
            raise _not_found(fid)
        return stored

    def get(self, fid: str, *, owner: str) -> FileObject:
        """`owner`'s file; another owner's is a 404 exactly like an unknown id."""
        return self._find(fid, owner).record

    def list(self, *, owner: str) -> list[FileObject]:
        """`owner`'s files, oldest first."""
        self._owner_dir(owner)
        return [stored.record for stored in self._index.get(owner, {}).values()]

    async def locate(self, fid: str, *, owner: str) -> StoredFile:
        """`owner`'s file with the path of its content, checked to still be there whole (a
        lost or truncated blob would otherwise surface as a confusing decode error)."""
        stored = self._find(fid, owner)
        if not await asyncio.to_thread(_intact, stored):
            raise MediaError(
                "file_not_found",
                f"the content of file {fid!r} is missing or damaged; upload the same file again",
                status=404,
            )
        return stored

    def _usage(self) -> tuple[int, int]:
        records = [s.record for files in self._index.values() for s in files.values()]
        return len(records), sum(r.bytes for r in records)

    # -- upload --

    def _open_part(self) -> tuple[IO[bytes], Path]:
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".part")
        return os.fdopen(fd, "wb"), Path(name)

    async def _spool(self, upload: UploadFile) -> _Spooled:
        """Copies the upload to a temp file, hashing as it goes; refuses oversize or empty
        uploads, removing the temp file on every error (cancellation included)."""
        handle, part = await asyncio.to_thread(self._open_part)
        digest = hashlib.sha256()
        size = 0
        try:
            while chunk := await upload.read(_CHUNK):
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise MediaError(
                        "file_too_large",
                        f"file exceeds the {self.max_file_bytes} byte limit",
                        status=413,
                    )
                await asyncio.to_thread(_absorb, handle, digest, chunk)
            if size == 0:
                raise MediaError("empty_file", "uploaded file is empty")
            await asyncio.to_thread(_seal, handle)
        except BaseException:
            # A thread runs to its end even if this await is cancelled: the part goes anyway.
            await asyncio.to_thread(_discard, handle, part)
            raise
        return _Spooled(part, digest.hexdigest(), size)

    async def save(
        self,
        upload: UploadFile,
        purpose: str,
        validate: Callable[[Path], object],
        *,
        owner: str,
    ) -> FileObject:
        """Stores an upload in `owner`'s namespace after `validate(path)` (run in a thread)
        accepts it. The same bytes again return the existing record (repairing its content
        if that was lost)."""
        self._owner_dir(owner)
        spooled = await self._spool(upload)
        filename = Path(upload.filename or "upload").name
        # Shielded: once spooled, the upload is finished (and its part removed) even if the
        # request is cancelled, so the index in memory never disagrees with the disk.
        return await asyncio.shield(self._finish(spooled, purpose, validate, filename, owner))

    async def _finish(
        self,
        spooled: _Spooled,
        purpose: str,
        validate: Callable[[Path], object],
        filename: str,
        owner: str,
    ) -> FileObject:
        fid = file_id(spooled.sha256)
        try:
            await asyncio.to_thread(validate, spooled.part)
            async with self._lock:
                existing = self._index.get(owner, {}).get(fid)
                if existing is None:
                    count, used = self._usage()
                    if count >= self.max_files or used + spooled.size > self.max_bytes:
                        raise MediaError(
                            "file_store_full",
                            f"file store is full ({count} files, {used} bytes; limits "
                            f"{self.max_files} files, {self.max_bytes} bytes): "
                            "delete files first",
                            status=429,
                        )
                await asyncio.to_thread(self._place_blob, spooled, fid)
                if existing is not None:
                    return existing.record
                record = FileObject(
                    id=fid,
                    bytes=spooled.size,
                    created_at=int(time.time()),
                    filename=filename,
                    purpose=purpose,
                )
                try:
                    await asyncio.to_thread(self._write_record, owner, record, spooled.sha256)
                except BaseException:
                    if not any(fid in files for files in self._index.values()):
                        await asyncio.to_thread(self._blob_path(fid).unlink, missing_ok=True)
                    raise
                stored = StoredFile(record, spooled.sha256, self._blob_path(fid))
                self._index.setdefault(owner, {})[fid] = stored
                return record
        finally:
            await asyncio.to_thread(spooled.part.unlink, missing_ok=True)

    def _place_blob(self, spooled: _Spooled, fid: str) -> None:
        """Keeps content already there when its size is right (the id is its digest, so a
        re-hash would cost a full read for nothing); otherwise (lost, truncated, or orphaned
        by a crash) the new upload's bytes take its place."""
        blob = self._blob_path(fid)
        with contextlib.suppress(FileNotFoundError):
            if blob.stat().st_size == spooled.size:
                return
        if blob.exists():
            logger.warning("file store: replacing damaged content of %s", fid)
        os.replace(spooled.part, blob)
        _fsync_dir(self._blobs)

    def _write_record(self, owner: str, record: FileObject, sha256: str) -> None:
        owner_dir = self._owner_dir(owner)
        if not owner_dir.is_dir():
            owner_dir.mkdir(exist_ok=True)
            _fsync_dir(self._owners_dir)
        _write_atomic(self._tmp, owner_dir / f"{record.id}.json", _record_bytes(record, sha256))

    # -- delete --

    async def delete(self, fid: str, *, owner: str) -> None:
        """Removes `owner`'s file; its content goes once no namespace holds it."""
        self._find(fid, owner)
        await asyncio.shield(self._delete(fid, owner))

    async def _delete(self, fid: str, owner: str) -> None:
        async with self._lock:
            if fid not in self._index.get(owner, {}):
                raise _not_found(fid)  # deleted meanwhile by a concurrent request
            record_path = self._owner_dir(owner) / f"{fid}.json"
            await asyncio.to_thread(_unlink_durably, record_path)
            del self._index[owner][fid]
            if not any(fid in files for files in self._index.values()):
                await asyncio.to_thread(_unlink_durably, self._blob_path(fid))


def _unlink_durably(path: Path) -> None:
    """Record before blob, each durable before the next: a crash between leaves an orphan
    blob (removed at start-up), never a record without content."""
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)
