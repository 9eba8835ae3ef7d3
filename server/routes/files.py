"""`/v1/files`: upload a video once, ask about it many times.

Every route works in the caller's namespace (`OwnerDep`): one key never sees, uses or deletes
another key's files. No route touches the disk on the event loop (see `FileStore`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from server.schemas import FileDeleted, FileList, FileObject
from server.state import OwnerDep, StateDep, require_api_key
from stts_vllm.media.decode import probe

router = APIRouter(prefix="/v1/files", dependencies=[Depends(require_api_key)])


def _validate_video(path: Path) -> None:
    """Only videos are stored: probing decodes the first frame, so a corrupt file fails here."""
    probe(path)


@router.post("", response_model=FileObject)
async def upload_file(
    state: StateDep,
    owner: OwnerDep,
    file: Annotated[UploadFile, File(description="the video")],
    purpose: Annotated[str, Form(min_length=1, max_length=64)],
) -> FileObject:
    return await state.files.save(file, purpose, _validate_video, owner=owner)


@router.get("", response_model=FileList)
async def list_files(state: StateDep, owner: OwnerDep) -> FileList:
    # the store reads its records from disk (shared by every replica): not on the event loop
    return FileList(data=await asyncio.to_thread(state.files.list, owner=owner))


@router.get("/{file_id}", response_model=FileObject)
async def get_file(file_id: str, state: StateDep, owner: OwnerDep) -> FileObject:
    return await asyncio.to_thread(state.files.get, file_id, owner=owner)


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, state: StateDep, owner: OwnerDep) -> FileDeleted:
    await state.files.delete(file_id, owner=owner)
    return FileDeleted(id=file_id, deleted=True)
