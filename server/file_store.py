"""Uploaded files: a bounded, content-addressed, per-owner store on disk, shared by every
replica whose `--files-dir` is the same directory (one volume mounted by several pods).

A file's id derives from its SHA-256, so uploading the same video twice costs nothing and
its decoded frames (and vLLM's encoder cache) are shared by every question about it.

Every caller owns a namespace (`server.state.OwnerDep`): it lists, gets, deletes and uses only
its own files, and another owner's id is a 404 exactly like an unknown one. Content is stored
once however many namespaces hold it. Layout under `root`:

    blobs/<file id>.bin            the bytes, shared by every namespace that holds them
    owners/<owner>/<file id>.json  one namespace's record of a file (FileObject + sha256)
    tmp/<replica>/                 one process's uploads being spooled and records being written
    store.lock                     the lock every change takes, across processes

The disk is the index: `get`, `list` and `locate` read the records, so a file saved or deleted
by any replica is seen by every other at once; no process keeps an index of its own. Changes
(placing a blob and its record, deleting them, the start-up sweep) hold an exclusive `flock`
on `store.lock`, so replicas never interleave them.

Crash safety: blobs and records only ever appear by `os.replace` of a fully written, fsynced
temp file (then the directory is fsynced), so a record is never truncated. A blob is placed
before its record and a record removed before its blob, both under the lock, so a crash leaves
at worst a blob no record names or a temp file. Start-up (the constructor), under the lock,
removes orphan blobs, drops unreadable records with a warning, moves the old flat layout
(`root/file-*.json` + `.bin`) into the shared namespace, and removes the temp files of
processes that are gone: each process holds a lock on its own temp directory while it runs,
so another replica's upload in flight is never touched. A record whose blob was lost anyway is
repaired by uploading the same bytes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
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
        self._tmp_root = root / "tmp"
        self._lock = asyncio.Lock()  # this process's changes, before the cross-process lock
        for path in (root, self._blobs, self._owners_dir, self._tmp_root):
            path.mkdir(parents=True, exist_ok=True)
        replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = self._tmp_root / replica
        self._tmp.mkdir()
        # held while this process lives: the mark that its temp files are still in use
        self._alive = open(self._tmp / ".alive", "w")  # noqa: SIM115
        fcntl.flock(self._alive, fcntl.LOCK_EX)
        with self._store_lock():
            self._recover()

    def close(self) -> None:
        """Drops this process's temp directory (a crashed one is swept by the next start)."""
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._alive.close()

    # -- locking --

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """The cross-process lock of every change (blocking: call it in a thread)."""
        with open(self.root / "store.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- start-up --

    def _recover(self) -> None:
        for entry in self._tmp_root.iterdir():
            if entry.is_dir():
                if entry != self._tmp:
                    _sweep_if_gone(entry)
            else:  # a version before per-process temp directories
                _remove(entry, "temp file left by an interrupted upload or write")
        for part in self.root.glob("*.part"):
            _remove(part, "temp file left by an interrupted upload or write")
        self._migrate_flat_layout()
        referenced: set[str] = set()
        for owner_dir in sorted(self._owners_dir.iterdir()):
            if not (owner_dir.is_dir() and _OWNER.fullmatch(owner_dir.name)):
                logger.warning("file store: ignoring %s (not a namespace)", owner_dir)
                continue
            for stored in self._read_owner(owner_dir, remove_bad=True):
                referenced.add(stored.record.id)
                if not _intact(stored):
                    logger.warning(
                        "file store: the content of %s is missing or damaged; uploading it "
                        "again repairs it",
                        stored.record.id,
                    )
        for blob in self._blobs.glob("*.bin"):
            if blob.stem not in referenced:
                _remove(blob, "content no record refers to")

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

    # -- records on disk --

    def _read_owner(self, owner_dir: Path, *, remove_bad: bool = False) -> list[StoredFile]:
        """A namespace's records, oldest first; an unreadable one is skipped (and removed at
        start-up, under the lock: records only appear whole, so it is damage, not a write in
        progress)."""
        loaded: list[tuple[float, StoredFile]] = []
        for path in owner_dir.glob("*.json"):
            try:
                record, sha256 = _parse_record(path)
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue  # deleted meanwhile
            except (OSError, ValueError, ValidationError) as exc:
                if remove_bad:
                    _remove(path, f"unreadable record: {exc}")
                else:
                    logger.warning("file store: skipping unreadable record %s: %s", path, exc)
                continue
            loaded.append((mtime, StoredFile(record, sha256, self._blob_path(record.id))))
        loaded.sort(key=lambda item: (item[1].record.created_at, item[0], item[1].record.id))
        return [stored for _, stored in loaded]

    def _read(self, fid: str, owner: str) -> StoredFile | None:
        path = self._owner_dir(owner) / f"{fid}.json"
        try:
            record, sha256 = _parse_record(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as exc:
            logger.warning("file store: skipping unreadable record %s: %s", path, exc)
            return None
        return StoredFile(record, sha256, self._blob_path(fid))

    def _held_anywhere(self, fid: str) -> bool:
        return any((d / f"{fid}.json").exists() for d in self._owners_dir.iterdir() if d.is_dir())

    # -- paths --

    def _blob_path(self, fid: str) -> Path:
        return self._blobs / f"{fid}.bin"

    def _owner_dir(self, owner: str) -> Path:
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"invalid file namespace {owner!r}")
        return self._owners_dir / owner

    # -- reads (from disk: what any replica saved is seen at once) --

    def _find(self, fid: str, owner: str) -> StoredFile:
        self._owner_dir(owner)
        stored = self._read(fid, owner) if _FILE_ID.fullmatch(fid) else None
        if stored is None:
            raise _not_found(fid)
        return stored

    def get(self, fid: str, *, owner: str) -> FileObject:
        """`owner`'s file; another owner's is a 404 exactly like an unknown id."""
        return self._find(fid, owner).record

    def list(self, *, owner: str) -> list[FileObject]:
        """`owner`'s files, oldest first."""
        owner_dir = self._owner_dir(owner)
        if not owner_dir.is_dir():
            return []
        return [stored.record for stored in self._read_owner(owner_dir)]

    async def locate(self, fid: str, *, owner: str) -> StoredFile:
        """`owner`'s file with the path of its content, checked to still be there whole (a
        lost or truncated blob would otherwise surface as a confusing decode error)."""
        stored = await asyncio.to_thread(self._find, fid, owner)
        if not await asyncio.to_thread(_intact, stored):
            raise MediaError(
                "file_not_found",
                f"the content of file {fid!r} is missing or damaged; upload the same file again",
                status=404,
            )
        return stored

    def _usage(self) -> tuple[int, int]:
        records = [
            stored.record
            for owner_dir in self._owners_dir.iterdir()
            if owner_dir.is_dir()
            for stored in self._read_owner(owner_dir)
        ]
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
        # request is cancelled.
        return await asyncio.shield(self._finish(spooled, purpose, validate, filename, owner))

    async def _finish(
        self,
        spooled: _Spooled,
        purpose: str,
        validate: Callable[[Path], object],
        filename: str,
        owner: str,
    ) -> FileObject:
        try:
            await asyncio.to_thread(validate, spooled.part)
            async with self._lock:
                return await asyncio.to_thread(self._commit, spooled, purpose, filename, owner)
        finally:
            await asyncio.to_thread(spooled.part.unlink, missing_ok=True)

    def _commit(self, spooled: _Spooled, purpose: str, filename: str, owner: str) -> FileObject:
        """Blob, then record, under the store lock: every replica sees both or neither."""
        fid = file_id(spooled.sha256)
        with self._store_lock():
            existing = self._read(fid, owner)
            if existing is None:
                count, used = self._usage()
                if count >= self.max_files or used + spooled.size > self.max_bytes:
                    raise MediaError(
                        "file_store_full",
                        f"file store is full ({count} files, {used} bytes; limits "
                        f"{self.max_files} files, {self.max_bytes} bytes): delete files first",
                        status=429,
                    )
            self._place_blob(spooled, fid)
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
                self._write_record(owner, record, spooled.sha256)
            except BaseException:
                if not self._held_anywhere(fid):
                    self._blob_path(fid).unlink(missing_ok=True)
                raise
            return record

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
        await asyncio.to_thread(self._find, fid, owner)
        await asyncio.shield(self._delete(fid, owner))

    async def _delete(self, fid: str, owner: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._remove_locked, fid, owner)

    def _remove_locked(self, fid: str, owner: str) -> None:
        with self._store_lock():
            record_path = self._owner_dir(owner) / f"{fid}.json"
            if not record_path.exists():
                raise _not_found(fid)  # deleted meanwhile, here or by another replica
            _unlink_durably(record_path)
            if not self._held_anywhere(fid):
                _unlink_durably(self._blob_path(fid))


def _sweep_if_gone(tmp_dir: Path) -> None:
    """Removes another process's temp directory once that process is gone: it held a lock on
    `.alive` while it lived (a crashed or stopped process's lock is released by the kernel)."""
    alive = tmp_dir / ".alive"
    try:
        handle = open(alive)  # noqa: SIM115
    except FileNotFoundError:
        # a process marks its directory just after making it: give it that moment
        with contextlib.suppress(FileNotFoundError):
            if time.time() - tmp_dir.stat().st_mtime > 60:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live replica's uploads in flight: not ours to touch
        logger.warning("file store: removing %s (temp files of a process that is gone)", tmp_dir)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _unlink_durably(path: Path) -> None:
    """Record before blob, each durable before the next: a crash between leaves an orphan
    blob (removed at start-up), never a record without content."""
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)
