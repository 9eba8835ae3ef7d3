"""Uploaded files: a bounded, content-addressed store on disk.

A file's id derives from its SHA-256, so uploading the same video twice costs nothing and
its decoded frames (and vLLM's encoder cache) are shared by every question about it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import time
from pathlib import Path

from fastapi import UploadFile

from server.media_errors import MediaError
from server.schemas import FileObject

_CHUNK = 1024 * 1024


def file_id(digest: str) -> str:
    return f"file-{digest[:32]}"


class FileStore:
    def __init__(self, root: Path, *, max_files: int, max_bytes: int, max_file_bytes: int) -> None:
        self.root = root
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self._lock = asyncio.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def _meta_path(self, fid: str) -> Path:
        return self.root / f"{fid}.json"

    def data_path(self, fid: str) -> Path:
        return self.root / f"{fid}.bin"

    def get(self, fid: str) -> FileObject:
        meta = self._meta_path(fid)
        if not fid.startswith("file-") or "/" in fid or not meta.exists():
            raise MediaError("file_not_found", f"no file with id {fid!r}", status=404)
        return FileObject.model_validate_json(meta.read_text())

    def digest(self, fid: str) -> str:
        return str(json.loads(self._meta_path(fid).read_text())["sha256"])

    def list(self) -> list[FileObject]:
        metas = sorted(self.root.glob("file-*.json"), key=lambda p: p.stat().st_mtime)
        return [FileObject.model_validate_json(p.read_text()) for p in metas]

    def _usage(self) -> tuple[int, int]:
        files = self.list()
        return len(files), sum(f.bytes for f in files)

    async def _spool(self, upload: UploadFile) -> tuple[Path, str, int]:
        """Copy the upload to a temp file in the store, hashing as it goes; refuses oversize."""
        digest = hashlib.sha256()
        size = 0
        with tempfile.NamedTemporaryFile(dir=self.root, suffix=".part", delete=False) as handle:
            part = Path(handle.name)
            try:
                while chunk := await upload.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise MediaError(
                            "file_too_large",
                            f"file exceeds the {self.max_file_bytes} byte limit",
                            status=413,
                        )
                    digest.update(chunk)
                    handle.write(chunk)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        if size == 0:
            part.unlink(missing_ok=True)
            raise MediaError("empty_file", "uploaded file is empty")
        return part, digest.hexdigest(), size

    async def save(self, upload: UploadFile, purpose: str, validate) -> FileObject:
        """Store an upload after `validate(path)` (run in a thread) accepts it."""
        part, digest, size = await self._spool(upload)
        fid = file_id(digest)
        try:
            await asyncio.to_thread(validate, part)
            async with self._lock:
                if self._meta_path(fid).exists():
                    return self.get(fid)
                count, used = self._usage()
                if count >= self.max_files or used + size > self.max_bytes:
                    raise MediaError(
                        "file_store_full",
                        f"file store is full ({count} files, {used} bytes; limits "
                        f"{self.max_files} files, {self.max_bytes} bytes): delete files first",
                        status=429,
                    )
                part.replace(self.data_path(fid))
                record = FileObject(
                    id=fid,
                    bytes=size,
                    created_at=int(time.time()),
                    filename=Path(upload.filename or "upload").name,
                    purpose=purpose,
                )
                meta = record.model_dump() | {"sha256": digest}
                self._meta_path(fid).write_text(json.dumps(meta))
                return record
        finally:
            part.unlink(missing_ok=True)

    async def delete(self, fid: str) -> bool:
        self.get(fid)
        async with self._lock:
            self._meta_path(fid).unlink(missing_ok=True)
            self.data_path(fid).unlink(missing_ok=True)
        return True
