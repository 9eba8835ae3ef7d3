"""The file store on its own (no server): crash safety, self-repair, namespaces, limits."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.datastructures import UploadFile

from server.file_store import SHARED_OWNER, FileStore, file_id
from stts_vllm.media.errors import MediaError

A = "key-aaaaaaaaaaaaaaaa"
B = "key-bbbbbbbbbbbbbbbb"


def _store(root: Path, **limits: int) -> FileStore:
    options = {"max_files": 8, "max_bytes": 1 << 20, "max_file_bytes": 1 << 16} | limits
    return FileStore(root, **options)


def _accept(_: Path) -> None:
    pass


def _save(store: FileStore, data: bytes, owner: str = SHARED_OWNER, name: str = "v.mp4") -> str:
    upload = UploadFile(file=io.BytesIO(data), filename=name)
    return asyncio.run(store.save(upload, "vision", _accept, owner=owner)).id


def _error(call: Any) -> MediaError:
    with pytest.raises(MediaError) as info:
        asyncio.run(call) if asyncio.iscoroutine(call) else call()
    return info.value


def _temp_files(root: Path) -> list[Path]:
    """Temp files left anywhere (a live store's own directory and its `.alive` mark aside)."""
    files = [p for p in (root / "tmp").rglob("*") if p.is_file() and p.name != ".alive"]
    return [*files, *root.glob("*.part")]


def _blob(root: Path, fid: str) -> Path:
    return root / "blobs" / f"{fid}.bin"


def _record(root: Path, owner: str, fid: str) -> Path:
    return root / "owners" / owner / f"{fid}.json"


def test_upload_list_get_delete_and_dedupe(tmp_path: Path) -> None:
    store = _store(tmp_path)
    fid = _save(store, b"video one", name="dir/one.mp4")
    assert fid == _save(store, b"video one", name="again.mp4")  # same bytes, same file
    record = store.get(fid, owner=SHARED_OWNER)
    assert (record.filename, record.bytes, record.purpose) == ("one.mp4", 9, "vision")
    assert [f.id for f in store.list(owner=SHARED_OWNER)] == [fid]
    assert _blob(tmp_path, fid).read_bytes() == b"video one"
    asyncio.run(store.delete(fid, owner=SHARED_OWNER))
    assert store.list(owner=SHARED_OWNER) == []
    assert not _blob(tmp_path, fid).exists() and not _record(tmp_path, SHARED_OWNER, fid).exists()
    assert _error(lambda: store.get(fid, owner=SHARED_OWNER)).status == 404
    assert _error(store.delete(fid, owner=SHARED_OWNER)).status == 404
    # survives a restart
    kept = _save(store, b"video two")
    assert [f.id for f in _store(tmp_path).list(owner=SHARED_OWNER)] == [kept]


@pytest.mark.parametrize("fid", ["file-x", "file-../../etc", "nope", f"file-{'A' * 32}"])
def test_malformed_ids_are_not_found(tmp_path: Path, fid: str) -> None:
    assert _error(lambda: _store(tmp_path).get(fid, owner=SHARED_OWNER)).code == "file_not_found"


def test_errors_remove_their_temp_file(tmp_path: Path) -> None:
    store = _store(tmp_path, max_files=1, max_file_bytes=10)
    assert _error(lambda: _save(store, b"x" * 11)).status == 413
    assert _error(lambda: _save(store, b"")).code == "empty_file"

    def refuse(_: Path) -> None:
        raise MediaError("invalid_video", "not a video")

    upload = UploadFile(file=io.BytesIO(b"junk"), filename="j.mp4")
    assert _error(store.save(upload, "vision", refuse, owner=SHARED_OWNER)).code == "invalid_video"
    _save(store, b"first")
    assert _error(lambda: _save(store, b"second")).status == 429
    assert _temp_files(tmp_path) == []


def test_corrupt_records_are_skipped_and_removed_at_start_up(tmp_path: Path) -> None:
    store = _store(tmp_path)
    good = _save(store, b"good video")
    bad = _save(store, b"bad video")
    _record(tmp_path, SHARED_OWNER, bad).write_text('{"id": "file-')  # crash mid-write (old code)
    wrong = _record(tmp_path, SHARED_OWNER, file_id("f" * 64))  # valid JSON, not a record
    wrong.write_text(json.dumps({"id": "other"}))
    # the running store skips what it cannot read; a restart removes it
    assert [f.id for f in store.list(owner=SHARED_OWNER)] == [good]
    assert _error(lambda: store.get(bad, owner=SHARED_OWNER)).status == 404
    restarted = _store(tmp_path)
    assert [f.id for f in restarted.list(owner=SHARED_OWNER)] == [good]
    assert not _record(tmp_path, SHARED_OWNER, bad).exists() and not wrong.exists()
    assert not _blob(tmp_path, bad).exists()  # its content no longer referenced
    assert _save(restarted, b"bad video") == bad  # uploads work, and repair the lost file
    assert _blob(tmp_path, bad).read_bytes() == b"bad video"


def test_failed_record_write_leaves_a_consistent_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)

    def crash(*_: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(FileStore, "_write_record", crash)
    with pytest.raises(OSError):
        _save(store, b"video")
    monkeypatch.undo()
    assert store.list(owner=SHARED_OWNER) == [] and _temp_files(tmp_path) == []
    assert list((tmp_path / "blobs").iterdir()) == []
    assert _save(store, b"video") == file_id(hashlib.sha256(b"video").hexdigest())


def test_crash_between_blob_and_record_is_cleaned_at_start_up(tmp_path: Path) -> None:
    """What a killed process leaves: a placed blob with no record, temp files of an upload
    and of a record write, and a `.part` of the old flat layout."""
    store = _store(tmp_path)
    kept = _save(store, b"kept")
    orphan = _blob(tmp_path, file_id("0" * 64))
    orphan.write_bytes(b"placed, never recorded")
    for leftover in ("tmp/abc.part", "tmp/def.tmp", "xyz.part"):
        (tmp_path / leftover).write_bytes(b"partial")
    restarted = _store(tmp_path)
    assert not orphan.exists() and _temp_files(tmp_path) == []
    assert [f.id for f in restarted.list(owner=SHARED_OWNER)] == [kept]
    assert _blob(tmp_path, kept).read_bytes() == b"kept"


@pytest.mark.parametrize("damage", ["lost", "truncated"])
def test_lost_content_is_repaired_by_uploading_it_again(tmp_path: Path, damage: str) -> None:
    store = _store(tmp_path)
    fid = _save(store, b"precious video")
    blob = _blob(tmp_path, fid)
    if damage == "lost":
        blob.unlink()
    else:
        blob.write_bytes(b"prec")
    error = _error(store.locate(fid, owner=SHARED_OWNER))
    assert (error.status, error.code) == (404, "file_not_found") and "again" in error.message
    assert _save(store, b"precious video") == fid
    assert blob.read_bytes() == b"precious video"
    assert asyncio.run(store.locate(fid, owner=SHARED_OWNER)).path == blob
    # the same holds across a restart
    blob.unlink()
    restarted = _store(tmp_path)
    assert [f.id for f in restarted.list(owner=SHARED_OWNER)] == [fid]
    assert _save(restarted, b"precious video") == fid and blob.exists()


def test_owners_see_only_their_own_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    fid = _save(store, b"shared bytes", owner=A, name="a.mp4")
    missing = _error(lambda: store.get("file-" + "0" * 32, owner=B))
    for call in (
        lambda: store.get(fid, owner=B),
        store.locate(fid, owner=B),
        store.delete(fid, owner=B),
    ):
        error = _error(call)
        assert (error.status, error.code) == (missing.status, missing.code)
        assert error.message == missing.message.replace("0" * 32, fid[5:])
    assert store.list(owner=B) == [] and store.list(owner=SHARED_OWNER) == []
    assert _save(store, b"shared bytes", owner=B, name="b.mp4") == fid  # same content, same id
    assert store.get(fid, owner=B).filename == "b.mp4"
    assert store.get(fid, owner=A).filename == "a.mp4"
    asyncio.run(store.delete(fid, owner=A))
    assert _error(lambda: store.get(fid, owner=A)).status == 404
    assert asyncio.run(store.locate(fid, owner=B)).path.read_bytes() == b"shared bytes"
    assert [f.id for f in _store(tmp_path).list(owner=B)] == [fid]  # and after a restart
    asyncio.run(store.delete(fid, owner=B))
    assert not _blob(tmp_path, fid).exists()


def test_media_loader_fetches_only_the_owners_files(tmp_path: Path) -> None:
    from server.media import MediaLoader
    from server.settings import Settings

    store = _store(tmp_path)
    fid = _save(store, b"a's video", owner=A)
    loader = MediaLoader(Settings(), store, None)  # type: ignore[arg-type]  # fetch needs none
    media = asyncio.run(loader.fetch(fid, A))
    assert isinstance(media.data, Path) and media.data.read_bytes() == b"a's video"
    assert _error(loader.fetch(fid, B)).code == "file_not_found"
    assert _error(loader.fetch(fid)).code == "file_not_found"  # default: the shared namespace


def test_limits_are_global_across_owners(tmp_path: Path) -> None:
    store = _store(tmp_path, max_files=2)
    _save(store, b"one", owner=A)
    _save(store, b"two", owner=B)
    full = _error(lambda: _save(store, b"three", owner=SHARED_OWNER))
    assert (full.status, full.code) == (429, "file_store_full")
    assert _save(store, b"one", owner=A)  # a re-upload costs nothing
    # every namespace's record counts, even for content another namespace holds too
    assert _error(lambda: _save(store, b"one", owner=B)).status == 429

    by_bytes = _store(tmp_path / "bytes", max_bytes=10)
    _save(by_bytes, b"x" * 6, owner=A)
    assert _error(lambda: _save(by_bytes, b"y" * 5, owner=B)).status == 429
    assert _error(lambda: _save(by_bytes, b"x" * 6, owner=B)).status == 429
    _save(by_bytes, b"y" * 4, owner=B)
    assert _temp_files(tmp_path / "bytes") == []


def test_flat_layout_moves_into_the_shared_namespace(tmp_path: Path) -> None:
    """The layout before namespaces: `root/<id>.json` (FileObject + sha256) and `root/<id>.bin`."""
    sha = hashlib.sha256(b"old video").hexdigest()
    fid = file_id(sha)
    meta = {"id": fid, "object": "file", "bytes": 9, "created_at": 1, "filename": "old.mp4"}
    (tmp_path / f"{fid}.json").write_text(json.dumps(meta | {"purpose": "vision", "sha256": sha}))
    (tmp_path / f"{fid}.bin").write_bytes(b"old video")
    orphan = file_id("1" * 64)
    (tmp_path / f"{orphan}.bin").write_bytes(b"no record")
    (tmp_path / f"{file_id('2' * 64)}.json").write_text("{trunc")
    store = _store(tmp_path)
    assert [f.filename for f in store.list(owner=SHARED_OWNER)] == ["old.mp4"]
    stored = asyncio.run(store.locate(fid, owner=SHARED_OWNER))
    assert stored.sha256 == sha and stored.path.read_bytes() == b"old video"
    assert _error(lambda: store.get(fid, owner=A)).status == 404
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "owners", "store.lock", "tmp"]
    assert [f.id for f in _store(tmp_path).list(owner=SHARED_OWNER)] == [fid]


def test_routes_work_in_the_callers_namespace(tmp_path: Path) -> None:
    """The `/v1/files` routes behind the request guard (no engine): each key sees only its
    own uploads."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from media import encode_mp4, level_video

    from server.error_handlers import install_error_handlers
    from server.http_guard import RequestGuard
    from server.routes import files
    from server.settings import Settings

    app = FastAPI()
    app.state.stts = SimpleNamespace(
        settings=Settings(api_keys=["ka", "kb"]), files=_store(tmp_path), draining=False
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard, state=app.state.stts)  # authenticates, as in the server
    app.include_router(files.router)
    video = encode_mp4(level_video(4))
    with TestClient(app) as client:
        a, b = ({"Authorization": f"Bearer {key}"} for key in ("ka", "kb"))
        upload = {"files": {"file": ("v.mp4", video)}, "data": {"purpose": "vision"}}
        fid = client.post("/v1/files", headers=a, **upload).json()["id"]
        assert [f["id"] for f in client.get("/v1/files", headers=a).json()["data"]] == [fid]
        assert client.get("/v1/files", headers=b).json()["data"] == []
        for response in (
            client.get(f"/v1/files/{fid}", headers=b),
            client.delete(f"/v1/files/{fid}", headers=b),
        ):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "file_not_found"
        assert client.post("/v1/files", headers=b, **upload).json()["id"] == fid
        assert client.delete(f"/v1/files/{fid}", headers=a).json()["deleted"]
        assert client.get(f"/v1/files/{fid}", headers=b).json()["filename"] == "v.mp4"
        assert client.get("/v1/files").status_code == 401


def test_replicas_on_one_directory_see_each_others_files(tmp_path: Path) -> None:
    """Two stores on one directory, as two replicas on one volume: a file saved through
    either is listed, got and located through the other at once, a delete through one is
    seen by the other, and the limits count both."""
    one, two = _store(tmp_path, max_files=3), _store(tmp_path, max_files=3)
    fid = _save(one, b"clip one", owner=A)
    assert two.get(fid, owner=A).filename == "v.mp4"
    assert [f.id for f in two.list(owner=A)] == [fid]
    assert asyncio.run(two.locate(fid, owner=A)).path.read_bytes() == b"clip one"
    other = _save(two, b"clip two", owner=B)
    assert [f.id for f in one.list(owner=B)] == [other]
    asyncio.run(two.delete(fid, owner=A))
    assert _error(lambda: one.get(fid, owner=A)).status == 404
    assert _error(one.delete(fid, owner=A)).status == 404
    assert not _blob(tmp_path, fid).exists()
    _save(one, b"three")
    _save(two, b"four")
    assert _error(lambda: _save(one, b"five")).status == 429  # 3 files between them


def test_concurrent_uploads_through_two_replicas_lose_nothing(tmp_path: Path) -> None:
    one, two = _store(tmp_path, max_files=64), _store(tmp_path, max_files=64)

    async def upload(store: FileStore, data: bytes) -> str:
        upload = UploadFile(file=io.BytesIO(data), filename="c.mp4")
        return (await store.save(upload, "vision", _accept, owner=A)).id

    async def both() -> list[str]:
        jobs = [upload(one if i % 2 else two, b"clip %d" % (i % 20)) for i in range(40)]
        return await asyncio.gather(*jobs)

    ids = asyncio.run(both())
    assert len(set(ids)) == 20  # the same bytes through either replica: one file
    assert {f.id for f in one.list(owner=A)} == set(ids) == {f.id for f in two.list(owner=A)}
    assert all(asyncio.run(one.locate(fid, owner=A)).path.exists() for fid in ids)
    assert _temp_files(tmp_path) == []


def test_a_starting_replica_leaves_another_replicas_upload_alone(tmp_path: Path) -> None:
    """Start-up sweeps the temp files of processes that are gone, never those of a live one:
    an upload being spooled by one replica survives another replica's start."""
    live = _store(tmp_path)
    handle, part = live._open_part()  # an upload in flight
    handle.write(b"half of a video")
    crashed = tmp_path / "tmp" / "gone-replica"
    crashed.mkdir()
    (crashed / ".alive").write_text("")  # its process died: nobody holds the lock
    (crashed / "x.part").write_bytes(b"left behind")
    _store(tmp_path)  # another replica starts
    assert part.exists() and not crashed.exists()
    handle.close()
    live.close()
    assert not part.parent.exists()
