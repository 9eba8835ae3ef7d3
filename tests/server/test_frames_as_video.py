"""A video sent as image parts (lmms-eval's default mode, with or without a timestamp text
part before each frame) is read as one video under the server's `auto` policy: one media item,
the frame limits and STTS pruning of an uploaded video, the client's times as the frames'."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from media import moving_square_video
from PIL import Image

from tests.server.helpers import Server, assert_error, chat, data_url


def _frame_parts(n: int, times: list[float] | None = None) -> list[dict[str, Any]]:
    frames = moving_square_video(n, 112, 112, seed=3)
    parts: list[dict[str, Any]] = []
    for i, frame in enumerate(np.asarray(frames)):
        if times is not None:
            parts.append({"type": "text", "text": f"<{times[i]:g} seconds>"})
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        url = data_url(buffer.getvalue(), "image/png")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _ask(server: Server, parts: list[dict[str, Any]], **body: Any):
    content = [*parts, {"type": "text", "text": "What happens?"}]
    return chat(server, messages=[{"role": "user", "content": content}], max_tokens=1, **body)


def _one_pruned_video(response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    report = response.json()["stts"]
    (video,) = report["videos"]
    assert video["video_tokens_after"] < video["video_tokens_before"]
    return video


def test_frames_without_timestamps_are_one_pruned_video(server: Server) -> None:
    video = _one_pruned_video(_ask(server, _frame_parts(8)))
    assert video["frames_sampled"] == video["frames_collapsed"] == 8
    assert video["duration_seconds"] == 8 / 2.0  # spaced at the server's --fps


def test_fps_spaces_frames_sent_without_timestamps(server: Server) -> None:
    video = _one_pruned_video(_ask(server, _frame_parts(8), media_io_kwargs={"video": {"fps": 4}}))
    assert video["duration_seconds"] == 8 / 4


def test_timestamped_frames_are_one_video_at_the_clients_times(server: Server) -> None:
    """lmms-eval's Qwen3-VL message format; its last frame repeated to pad the count."""
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0]
    video = _one_pruned_video(_ask(server, _frame_parts(8, times)))
    assert video["frames_collapsed"] == 8
    # the frames' mean rate over the client's times: 7 intervals in 6 s
    assert abs(video["duration_seconds"] - (6.0 + 6 / 7)) < 1e-6


def test_a_requested_frame_count_picks_among_the_clients_frames(server: Server) -> None:
    """16 frames sent, 8 asked for (`media_io_kwargs.video.num_frames`, as with an uploaded
    video): the middle frame of each eighth of the run, at its client time."""
    times = [float(t) for t in range(16)]
    body = {"media_io_kwargs": {"video": {"num_frames": 8}}}
    video = _one_pruned_video(_ask(server, _frame_parts(16, times), **body))
    assert (video["frames_sampled"], video["frames_collapsed"]) == (8, 16)
    # frames 1, 3, ..., 15 (one each 2 s): the last lasts one interval more
    assert video["duration_seconds"] == 15.0 + 2.0


def test_a_clients_max_frames_caps_a_frame_run(server: Server) -> None:
    video = _one_pruned_video(_ask(server, _frame_parts(12), stts={"max_frames": 6}))
    assert (video["frames_sampled"], video["frames_collapsed"]) == (6, 12)
    # frames 1, 3, ..., 11 of a run spaced at --fps 2: one each second
    assert video["duration_seconds"] == 5.5 + 1.0


def test_a_run_below_k_stays_images(server: Server) -> None:
    """Three image parts (below the default 4) are three images: over this server's limit of
    two media a message."""
    assert_error(_ask(server, _frame_parts(3)), 400, "too_many_media", "has 3 images/videos")


def test_a_run_broken_by_text_stays_images(server: Server) -> None:
    parts = _frame_parts(4)
    parts.insert(2, {"type": "text", "text": "and then"})
    assert_error(_ask(server, parts), 400, "too_many_media", "has 4 images/videos")


def test_a_backwards_timestamp_is_a_400_naming_the_part(server: Server) -> None:
    response = _ask(server, _frame_parts(4, [0.0, 2.0, 1.0, 3.0]))
    assert_error(response, 400, "invalid_request", "goes back in time")
    assert response.json()["error"]["param"] == "messages.0.content.4"


def test_a_negative_timestamp_is_a_400_naming_the_part(server: Server) -> None:
    response = _ask(server, _frame_parts(4, [-0.5, 0.0, 1.0, 2.0]))
    assert_error(response, 400, "invalid_request", "is negative")
    assert response.json()["error"]["param"] == "messages.0.content.0"


def test_the_request_can_turn_the_policy_off(server: Server) -> None:
    response = _ask(server, _frame_parts(4), stts={"frames_as_video": False})
    assert_error(response, 400, "too_many_media", "has 4 images/videos")
