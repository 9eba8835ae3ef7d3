"""Work is refused before it starts: authentication before the body is read, bodies bounded
while they stream in (413), the whole request's media counted and costed before any video is
decoded; every request counted once with the status its client got."""

from __future__ import annotations

import base64
import io
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from media import encode_mp4, level_video, moving_square_video
from PIL import Image

from tests.server.helpers import (
    API_KEY,
    MAX_REQUEST_BYTES,
    MAX_VIDEO_BYTES,
    Server,
    assert_answered,
    assert_error,
    chat,
    data_url,
    metric_values,
    video_message,
)

SMALL = data_url(encode_mp4(moving_square_video(8, 112, 112, seed=3), fps=4))
DECODES = 'stts_video_decodes_total{cache="miss"}'


def _requests(server: Server, route: str, status: int) -> float:
    return metric_values(server).get(f'stts_requests_total{{route="{route}",status="{status}"}}', 0)


def _raw_exchange(server: Server, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request's head (and maybe part of a body) on a raw socket; the status line the
    server answers with, without the client ever sending the rest."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        response = b""
        while not _complete(response):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    status = int(response.split(b" ", 2)[1])
    return status, response


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def _head(path: str, length: int, *, key: str | None, content_type: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_authentication_comes_before_the_body(server: Server) -> None:
    """A 10 GB body announced without a key: 401 at once, not one byte of it read."""
    before = _requests(server, "/v1/chat/completions", 401)
    head = _head("/v1/chat/completions", 10**10, key=None, content_type="application/json")
    status, response = _raw_exchange(server, head)
    assert status == 401 and b"invalid_api_key" in response
    head = _head("/v1/files", 10**10, key="wrong", content_type="multipart/form-data; boundary=x")
    assert _raw_exchange(server, head)[0] == 401
    assert _requests(server, "/v1/chat/completions", 401) == before + 1


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("Bearer clé-😀", 401),
        ("Bearer \x00\x01", 400),  # h11 refuses control characters itself
        ("Basic abc", 401),
        ("Bearer", 401),
    ],
)
def test_odd_authorization_headers_are_401(server: Server, token: str, expected: int) -> None:
    head = (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + token.encode("utf-8")
        + b"\r\n\r\n"
    )
    status, response = _raw_exchange(server, head)
    assert status == expected, response


def test_declared_oversized_bodies_are_413_before_reading(server: Server) -> None:
    head = _head(
        "/v1/chat/completions", MAX_REQUEST_BYTES + 1, key=API_KEY, content_type="application/json"
    )
    status, response = _raw_exchange(server, head)
    assert status == 413 and b"request_too_large" in response
    head = _head(
        "/v1/files",
        MAX_VIDEO_BYTES + 2 * 1024 * 1024,
        key=API_KEY,
        content_type="multipart/form-data; boundary=x",
    )
    assert _raw_exchange(server, head)[0] == 413


def _chunks(total: int, size: int = 1024 * 1024) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def test_streamed_oversized_bodies_are_cut_off(server: Server) -> None:
    """No Content-Length (chunked): counted as it arrives, 413 at the first byte over."""
    with server.client() as client:
        response = client.post(
            "/v1/chat/completions",
            content=_chunks(MAX_REQUEST_BYTES + 4 * 1024 * 1024),
            headers={"Content-Type": "application/json"},
        )
    assert_error(response, 413, "request_too_large", "byte limit")


def test_streamed_oversized_upload_leaves_nothing_behind(server: Server) -> None:
    boundary = "stts-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nvision\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from _chunks(MAX_VIDEO_BYTES + 4 * 1024 * 1024)

    with server.client() as client:
        response = client.post(
            "/v1/files",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert response.status_code == 413, response.text
        assert client.get("/v1/models").status_code == 200
    files_dir = server.files_dir
    assert not list(files_dir.rglob("*.part")), list(files_dir.rglob("*"))


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _media_message(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]


def test_media_are_counted_per_request_before_any_fetch(server: Server) -> None:
    """Twelve videos over six messages (two each, within the per-message limit): refused
    before one of them is decoded."""
    decodes = metric_values(server).get(DECODES, 0)
    video = {"type": "video_url", "video_url": {"url": SMALL}}
    messages = [_media_message([video, video])[0] for _ in range(6)]
    assert_error(chat(server, messages=messages), 400, "too_many_media", "at most 2 per request")
    images = [{"type": "image_url", "image_url": {"url": _png(32, 32)}} for _ in range(2)]
    messages = [_media_message(images)[0] for _ in range(5)]
    assert_error(chat(server, messages=messages), 400, "too_many_media", "images")
    assert metric_values(server).get(DECODES, 0) == decodes


def test_client_frame_counts_are_bounded_by_the_server(server: Server) -> None:
    decodes = metric_values(server).get(DECODES, 0)
    response = chat(server, messages=video_message(SMALL), stts={"num_frames": 4096})
    assert_error(response, 400, "too_many_frames", "limit of 64 frames")
    assert response.json()["error"]["param"] == "stts.num_frames"
    response = chat(server, messages=video_message(SMALL), mm_processor_kwargs={"num_frames": 65})
    assert response.json()["error"]["param"] == "mm_processor_kwargs.num_frames"
    frames = [_png(32, 32)] * 65
    assert_error(
        chat(server, messages=video_message(frames)), 400, "too_many_frames", "65 frame images"
    )
    assert metric_values(server).get(DECODES, 0) == decodes
    # a client's own max_frames above the server's is lowered, not refused
    reply = chat(server, messages=video_message(SMALL), stts={"max_frames": 4096})
    assert reply.status_code == 200, reply.text


def test_video_tokens_are_checked_against_the_context_before_decoding(server: Server) -> None:
    """Two videos of 64 frames of 640x480 at keep 1.0 need ~15k video tokens, more than
    max_model_len (8192): refused before either is decoded."""
    big = {
        "type": "video_url",
        "video_url": {"url": data_url(encode_mp4(level_video(64, 480, 640), fps=8))},
    }
    decodes = metric_values(server).get(DECODES, 0)
    response = chat(
        server, messages=_media_message([big, big]), stts={"num_frames": 64, "keep_ratio": 1.0}
    )
    assert_error(response, 400, "context_length_exceeded", "max_model_len")
    assert metric_values(server).get(DECODES, 0) == decodes


def test_oversized_frame_images_are_refused_from_their_header(server: Server) -> None:
    huge = _png(4200, 4200)  # over max_image_pixels (4096²), a small PNG of one colour
    assert_error(
        chat(server, messages=video_message([huge, huge])), 400, "media_too_large", "pixel"
    )


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        ({"seed": 2**64}, True),
        ({"seed": -(2**64)}, True),
        ({"seed": 2**63 - 1, "temperature": 1.0}, False),
        ({"seed": -1}, False),
    ],
    ids=["seed-over", "seed-under", "seed-max", "seed-minus-one"],
)
def test_seeds(server: Server, body: dict[str, Any], refused: bool) -> None:
    """Seeds outside a signed 64-bit integer are a 400 naming `seed`; the whole range
    within it is served."""
    response = chat(server, messages=[{"role": "user", "content": "hi"}], ignore_eos=True, **body)
    if refused:
        assert_error(response, 400, "invalid_request", "seed")
        assert response.json()["error"]["param"] == "seed"
    else:
        assert response.status_code == 200, response.text
        assert_answered(response.json(), max_tokens=2)


@pytest.mark.parametrize("size", [(1, 250), (250, 1)], ids=["1x250", "250x1"])
def test_degenerate_frame_images_are_400(server: Server, size: tuple[int, int]) -> None:
    frames = [_png(*size)] * 2
    response = chat(server, messages=video_message(frames))
    assert_error(response, 400, None, "")


def test_client_errors_are_counted_with_their_status(server: Server) -> None:
    before = {s: _requests(server, "/v1/chat/completions", s) for s in (400, 404)}
    files_404 = _requests(server, "/v1/files", 404)
    assert_error(chat(server, messages=video_message("file-" + "0" * 32)), 404, None, "")
    assert_error(chat(server, messages=video_message("ftp://x")), 400, None, "")
    with server.client() as client:
        assert client.get("/v1/files/file-" + "1" * 32).status_code == 404
    assert _requests(server, "/v1/chat/completions", 404) == before[404] + 1
    assert _requests(server, "/v1/chat/completions", 400) == before[400] + 1
    assert _requests(server, "/v1/files", 404) == files_404 + 1
    assert _requests(server, "/v1/chat/completions", 500) == 0


def test_server_still_serves(server: Server) -> None:
    reply = chat(server, messages=video_message(SMALL))
    assert reply.status_code == 200, reply.text
