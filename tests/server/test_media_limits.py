"""Bounded media work on the real server: decoding costs at most about one pass over a video
however its frames are sampled and stops at the frame budget; remote media never reaches a
non-public address, allowlisted or not."""

from __future__ import annotations

import numpy as np
import pytest
from media import encode_keyframed_video

from tests.server.helpers import (
    MAX_DECODED_FRAMES,
    Server,
    assert_error,
    chat,
    data_url,
    metric_values,
    video_message,
)

FRAMES_DECODED = "stts_video_frames_decoded_total"


def _single_keyframe_video(frames: int, fps: int) -> bytes:
    """One keyframe at the start: every backward seek would land there."""
    rng = np.random.default_rng(frames)
    pixels = rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8)
    return encode_keyframed_video(pixels, fps=fps)


def test_sparse_sampling_of_a_single_keyframe_video_decodes_it_about_once(server: Server) -> None:
    frames = 600
    video = data_url(_single_keyframe_video(frames, fps=25))
    before = metric_values(server).get(FRAMES_DECODED, 0)
    reply = chat(server, messages=video_message(video), stts={"num_frames": 32})
    assert reply.status_code == 200, reply.text
    spent = metric_values(server)[FRAMES_DECODED] - before
    # forward-only seeking: one pass plus the probe's few frames (32 backward seeks to the
    # only keyframe would cost ~10k)
    assert frames * 0.9 <= spent <= frames + 40, spent


def test_decoding_stops_at_the_frame_budget(server: Server) -> None:
    video = data_url(_single_keyframe_video(MAX_DECODED_FRAMES + 300, fps=60))
    response = chat(server, messages=video_message(video), stts={"num_frames": 4})
    assert_error(response, 400, "decode_budget_exceeded", f"more than {MAX_DECODED_FRAMES}")
    assert chat(server, messages=video_message(video[:200] + "x")).status_code == 400


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:9/v.mp4",  # allowlisted, resolves to loopback
        "http://[64:ff9b::7f00:1]:9/v.mp4",  # allowlisted NAT64 form of 127.0.0.1
        "http://[::ffff:10.0.0.1]:9/v.mp4",  # allowlisted IPv4-mapped private address
    ],
)
def test_allowlisted_hosts_at_non_public_addresses_are_refused(server: Server, url: str) -> None:
    assert_error(chat(server, messages=video_message(url)), 400, "forbidden_url", "public")
