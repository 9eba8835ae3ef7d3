"""Every bad input gets an OpenAI-style error with the right status and a clear message, and
the server keeps answering."""

from __future__ import annotations

import io

import numpy as np
import pytest
from media import (
    audio_only_m4a,
    encode_mp4,
    encode_video,
    image,
    level_video,
    moving_square_video,
)

from tests.server.helpers import (
    Server,
    assert_answered,
    assert_error,
    chat,
    data_url,
    video_message,
)

GOOD = encode_mp4(moving_square_video(8, 112, 112, seed=5), fps=4)


def _corrupt_videos() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, expected code, text in the message)."""
    rng = np.random.default_rng(0)
    return {
        "random bytes": (
            rng.integers(0, 255, 4096, dtype=np.uint8).tobytes(),
            "invalid_video",
            "not a readable video",
        ),
        "truncated mp4": (GOOD[: len(GOOD) // 2], "invalid_video", "video"),
        "text file": (b"hello, this is not a video\n" * 50, "invalid_video", "not a readable"),
        "audio only": (audio_only_m4a(), "no_video_stream", "no video stream"),
        "zero frames": (encode_video(level_video(0, 32, 32)), None, "video"),
        "too large": (encode_mp4(level_video(4, 720, 1280)), "media_too_large", "pixel limit"),
        "too long": (
            encode_video(level_video(3, 32, 32), fps=1, times=[0, 100, 200]),
            "media_too_long",
            "s limit",
        ),
    }


@pytest.mark.parametrize("name", list(_corrupt_videos()))
def test_bad_video_files(server: Server, name: str) -> None:
    data, code, text = _corrupt_videos()[name]
    assert_error(
        chat(server, messages=video_message(data_url(data))),
        400,
        code,
        text,
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "text"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
            400,
            "invalid_request",
            "malformed content part at `messages.0.content`",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}
                        ],
                    }
                ]
            },
            400,
            "unsupported_content",
            "'input_audio' is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]},
            400,
            None,
            "content",
        ),
        (
            {"messages": video_message("data:video/mp4;base64,@@@not-base64@@@")},
            400,
            "invalid_base64",
            "not valid base64",
        ),
        ({"messages": video_message("data:video/mp4,rawdata")}, 400, "invalid_data_url", "base64"),
        (
            {"messages": video_message(data_url(GOOD, "image/png"))},
            400,
            "wrong_mime_type",
            "not a video",
        ),
        (
            {"messages": video_message("https://example.com/v.mp4")},
            400,
            "forbidden_url",
            "not allowed",
        ),
        (
            {"messages": video_message("http://127.0.0.1:1/v.mp4")},
            400,
            "forbidden_url",
            "not allowed",
        ),
        ({"messages": video_message("file:///etc/passwd")}, 400, "forbidden_url", "media root"),
        ({"messages": video_message("ftp://host/v.mp4")}, 400, "unsupported_url", "data:"),
        ({"messages": video_message("file-doesnotexist")}, 404, "file_not_found", "no file"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            *(
                                {"type": "video_url", "video_url": {"url": data_url(GOOD)}}
                                for _ in range(3)
                            )
                        ],
                    }
                ]
            },
            400,
            "too_many_media",
            "at most 2",
        ),
        (
            {"messages": video_message(data_url(GOOD)), "stts": {"keep_ratio": 0}},
            400,
            "invalid_request",
            "stts.keep_ratio",
        ),
        (
            {"messages": video_message(data_url(GOOD)), "stts": {"keep_ratio": 1.5}},
            400,
            "invalid_request",
            "stts.keep_ratio",
        ),
        (
            {"messages": video_message(data_url(GOOD)), "stts": {"bogus": 1}},
            400,
            "invalid_request",
            "stts.bogus",
        ),
        ({"messages": [], "max_tokens": 2}, 400, "invalid_request", "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "invalid_request", "n"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
            400,
            "invalid_request",
            "temperature",
        ),
        # any role is accepted, as by vLLM (custom roles); a message without one is not
        ({"messages": [{"content": "hi"}]}, 400, "invalid_request", "role"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"},
            404,
            "model_not_found",
            "does not exist",
        ),
        (
            {"messages": [{"role": "user", "content": "hi " * 9000}]},
            400,
            "invalid_request",
            "maximum context length",
        ),
    ],
)
def test_bad_requests(server: Server, body: dict, status: int, code: str | None, text: str) -> None:
    assert_error(chat(server, **body), status, code, text)


def test_too_many_media_names_the_way_out(server: Server) -> None:
    """A client that sends a video as frames (lmms-eval's default) is told the per-message
    limit, the setting that raises it, and `frames_as_video`, which sends them as one video."""
    frames = []
    for i in range(5):  # random frames, one PNG each
        buffer = io.BytesIO()
        image(112, 112, seed=i).save(buffer, format="PNG")
        url = data_url(buffer.getvalue(), "image/png")
        frames.append({"type": "image_url", "image_url": {"url": url}})
    messages = [{"role": "user", "content": frames}]
    response = chat(server, messages=messages, stts={"frames_as_video": False})
    assert_error(response, 400, "too_many_media", "message 0 has 5 images/videos; at most 2")
    message = response.json()["error"]["message"]
    assert "--max-media-per-message" in message and "STTS_MAX_MEDIA_PER_MESSAGE" in message
    assert '"frames_as_video": true' in message
    for stts in ({"frames_as_video": True}, {}):  # asked for, or the server's `auto` policy
        answered = chat(server, messages=messages, stts=stts, max_tokens=1)
        assert answered.status_code == 200, answered.text
        (video,) = answered.json()["stts"]["videos"]
        assert video["frames_sampled"] == video["frames_collapsed"] == 5


def test_a_placeholder_token_in_text_is_answered_as_text(server: Server) -> None:
    """A literal `<|image_pad|>` with no image behind it: answered, not a crash."""
    messages = [{"role": "user", "content": "<|image_pad|> hi"}]
    response = chat(server, messages=messages, ignore_eos=True)
    assert response.status_code == 200, response.text
    assert_answered(response.json(), max_tokens=2)


def test_malformed_json(server: Server) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert_error(response, 400, "invalid_request", "not valid JSON")


def test_file_upload_errors(server: Server) -> None:
    with server.client() as client:
        not_video = client.post(
            "/v1/files", files={"file": ("a.mp4", b"plain text")}, data={"purpose": "vision"}
        )
        empty = client.post("/v1/files", files={"file": ("a.mp4", b"")}, data={"purpose": "vision"})
        no_purpose = client.post("/v1/files", files={"file": ("a.mp4", GOOD)})
    assert_error(not_video, 400, "invalid_video", "not a readable video")
    assert_error(empty, 400, "empty_file", "empty")
    assert_error(no_purpose, 400, "invalid_request", "purpose")


def test_file_store_limit(server: Server) -> None:
    """The test server allows 4 files: the fifth distinct upload is refused until one is
    deleted."""
    client = server.openai()
    for f in client.files.list().data:
        client.files.delete(f.id)
    ids = [
        client.files.create(file=(f"{i}.mp4", encode_mp4(level_video(4 + i))), purpose="vision").id
        for i in range(4)
    ]
    with server.client() as http:
        full = http.post(
            "/v1/files",
            files={"file": ("x.mp4", encode_mp4(level_video(12)))},
            data={"purpose": "vision"},
        )
    assert_error(full, 429, "file_store_full", "delete files first")
    for fid in ids:
        client.files.delete(fid)


def test_file_url_inside_media_root_is_allowed(server: Server) -> None:
    (server.media_root / "ok.mp4").write_bytes(GOOD)
    response = chat(server, messages=video_message(f"file://{server.media_root}/ok.mp4"))
    assert response.status_code == 200, response.text
    escape = f"file://{server.media_root}/../model/config.json"
    assert_error(chat(server, messages=video_message(escape)), 400, "forbidden_url", "media root")


def test_server_still_answers_after_bad_inputs(server: Server) -> None:
    response = chat(server, messages=video_message(data_url(GOOD)), ignore_eos=True)
    assert response.status_code == 200, response.text
    assert_answered(response.json(), max_tokens=2)
    assert response.json()["stts"]["videos"][0]["frames_sampled"] > 0
