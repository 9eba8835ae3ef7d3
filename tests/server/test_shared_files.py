"""Two real `stts-serve` processes on one files directory, as two replicas on one volume: a
file uploaded through either is used, listed and deleted through the other at once, and a
replica restarting while the other receives an upload leaves that upload whole."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from media import encode_video, moving_square_video

from tests.processes import free_port, server_env, server_process
from tests.server.helpers import API_KEY, Server, chat, video_message


def _start_replica(server: Server, log: Path):
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", _model_of(server), "--port", str(port)]
    argv += ["--max-model-len", "8192"]
    env = server_env(STTS_API_KEY=API_KEY, STTS_FILES_DIR=str(server.files_dir), STTS_MAX_FILES="4")
    url = f"http://127.0.0.1:{port}"
    return server_process(argv, url, "/ready", log, env), url


def _model_of(server: Server) -> str:
    return str(server.files_dir.parent / "model")  # the session server's demo checkpoint


@pytest.fixture(scope="module")
def replica(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second server on the session server's files directory."""
    log = tmp_path_factory.mktemp("replica") / "server.log"
    process, url = _start_replica(server, log)
    with process:
        yield Server(url=url, media_root=server.media_root, log=log, files_dir=server.files_dir)


def _upload(server: Server, data: bytes, name: str = "clip.mp4") -> httpx.Response:
    with server.client() as client:
        return client.post(
            "/v1/files", files={"file": (name, data, "video/mp4")}, data={"purpose": "vision"}
        )


def test_an_upload_through_one_replica_is_used_listed_and_deleted_through_the_other(
    server: Server, replica: Server
) -> None:
    clip = encode_video(moving_square_video(8, 64, 80, seed=31), fps=4)
    response = _upload(server, clip)
    assert response.status_code == 200, response.text
    fid = response.json()["id"]
    with replica.client() as client:
        assert client.get(f"/v1/files/{fid}").json()["id"] == fid
        assert fid in [f["id"] for f in client.get("/v1/files").json()["data"]]
    answer = chat(replica, messages=video_message(fid))
    assert answer.status_code == 200, answer.text
    assert answer.json()["stts"]["videos"][0]["video_tokens_after"] > 0
    with replica.client() as client:
        assert client.delete(f"/v1/files/{fid}").status_code == 200
    with server.client() as client:
        assert client.get(f"/v1/files/{fid}").status_code == 404
        assert fid not in [f["id"] for f in client.get("/v1/files").json()["data"]]
    gone = chat(server, messages=video_message(fid))
    assert gone.status_code == 404, gone.text


def test_a_replica_restarting_mid_upload_leaves_the_upload_whole(
    server: Server, tmp_path: Path
) -> None:
    """The upload streams slowly into the session server; halfway, a second replica on the
    same directory starts (its start-up sweeps the store's temp files of processes that are
    gone) and stops; the upload then finishes, whole, and serves."""
    clip = encode_video(moving_square_video(8, 64, 80, seed=32), fps=4)
    boundary = "stts-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nvision\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    halfway, go_on = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield head
        yield clip[: len(clip) // 2]
        halfway.set()
        assert go_on.wait(timeout=300)
        yield clip[len(clip) // 2 :]
        yield tail

    result: dict[str, httpx.Response] = {}

    def upload() -> None:
        headers = {
            "Authorization": f"Bearer {API_KEY}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        }
        result["response"] = httpx.post(
            f"{server.url}/v1/files", content=body(), headers=headers, timeout=300
        )

    thread = threading.Thread(target=upload)
    thread.start()
    assert halfway.wait(timeout=60)
    before = set((server.files_dir / "tmp").iterdir())
    process, _ = _start_replica(server, tmp_path / "restarted.log")
    with process:  # the replica is up (its store swept at start-up), then it stops
        assert set((server.files_dir / "tmp").iterdir()) > before
        time.sleep(0.5)
    go_on.set()
    thread.join(timeout=120)
    response = result["response"]
    assert response.status_code == 200, response.text
    fid = response.json()["id"]
    answer = chat(server, messages=video_message(fid))
    assert answer.status_code == 200, answer.text
    with server.client() as client:
        assert client.delete(f"/v1/files/{fid}").status_code == 200
