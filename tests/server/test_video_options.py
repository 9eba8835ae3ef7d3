"""`resolve_video_options`: one set of frame options from our `stts` extension, vLLM's
`mm_processor_kwargs` and `media_io_kwargs`, bounded by the server's frame limit; every refusal
a 400 naming the parameter the client sent (no engine, no server)."""

from __future__ import annotations

from typing import Any

import pytest

from server.chat_request import ChatRequest
from server.errors import APIError
from server.schemas import STTSOptions
from server.video_options import resolve_video_options

MESSAGES = [{"role": "user", "content": "hi"}]


def _request(**fields: Any) -> ChatRequest:
    return ChatRequest(messages=MESSAGES, **fields)


def _refusal(body: ChatRequest, max_frames: int | None = None) -> APIError:
    with pytest.raises(APIError) as caught:
        resolve_video_options(body, max_frames)
    assert caught.value.status == 400
    return caught.value


def test_no_options_are_the_defaults() -> None:
    assert resolve_video_options(_request()) == STTSOptions()
    assert resolve_video_options(_request(), max_frames=64) == STTSOptions()


def test_stts_options_pass_through() -> None:
    stts = {"keep_ratio": 0.25, "fps": 1.5, "num_frames": 12, "test_time_scaling": False}
    options = resolve_video_options(_request(stts=stts | {"frames_as_video": True}))
    assert options == STTSOptions(**stts, frames_as_video=True)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"mm_processor_kwargs": {"fps": 0.5}}, {"fps": 0.5}),
        ({"mm_processor_kwargs": {"num_frames": 6}}, {"num_frames": 6}),
        ({"mm_processor_kwargs": {"max_frames": 7}}, {"max_frames": 7}),
        ({"mm_processor_kwargs": {"stts_keep_ratio": 0.3}}, {"keep_ratio": 0.3}),
        ({"media_io_kwargs": {"video": {"num_frames": 8}}}, {"num_frames": 8}),
        ({"media_io_kwargs": {"video": {"fps": 1.0}}}, {"fps": 1.0}),
    ],
)
def test_vllm_knobs_map_onto_our_options(fields: dict, expected: dict) -> None:
    assert resolve_video_options(_request(**fields)) == STTSOptions(**expected)


def test_sources_combine_when_they_set_different_knobs() -> None:
    body = _request(
        stts={"keep_ratio": 0.5},
        mm_processor_kwargs={"fps": 1.0},
        media_io_kwargs={"video": {"num_frames": 4}},
    )
    assert resolve_video_options(body) == STTSOptions(keep_ratio=0.5, fps=1.0, num_frames=4)


def test_the_same_value_from_two_sources_is_no_conflict() -> None:
    body = _request(stts={"num_frames": 4}, media_io_kwargs={"video": {"num_frames": 4}})
    assert resolve_video_options(body).num_frames == 4


@pytest.mark.parametrize(
    ("fields", "param", "first"),
    [
        (
            {"stts": {"num_frames": 8}, "media_io_kwargs": {"video": {"num_frames": 4}}},
            "media_io_kwargs.video.num_frames",
            "stts.num_frames=8",
        ),
        (
            {"stts": {"keep_ratio": 0.5}, "mm_processor_kwargs": {"stts_keep_ratio": 0.3}},
            "mm_processor_kwargs.stts_keep_ratio",
            "stts.keep_ratio=0.5",
        ),
        (
            {"mm_processor_kwargs": {"fps": 2.0}, "media_io_kwargs": {"video": {"fps": 1.0}}},
            "media_io_kwargs.video.fps",
            "mm_processor_kwargs.fps=2.0",
        ),
    ],
)
def test_conflicting_sources_are_refused_naming_both(fields: dict, param: str, first: str) -> None:
    error = _refusal(_request(**fields))
    assert (error.param, error.code) == (param, "conflicting_parameters")
    assert param in error.message and f"conflicts with {first}" in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"mm_processor_kwargs": {"max_pixels": 9999}}, "mm_processor_kwargs.max_pixels"),
        ({"media_io_kwargs": {"image": {"x": 1}}}, "media_io_kwargs.image"),
        ({"media_io_kwargs": {"video": {"max_frames": 3}}}, "media_io_kwargs.video.max_frames"),
    ],
)
def test_knobs_the_plan_cannot_honour_are_refused(fields: dict, param: str) -> None:
    error = _refusal(_request(**fields))
    assert (error.param, error.code) == (param, "unsupported_parameter")
    assert param in error.message


@pytest.mark.parametrize(
    ("fields", "param", "text"),
    [
        ({"media_io_kwargs": {"video": {"fps": 0}}}, "media_io_kwargs.video.fps", "greater"),
        (
            {"mm_processor_kwargs": {"stts_keep_ratio": 1.5}},
            "mm_processor_kwargs.stts_keep_ratio",
            "less",
        ),
        (
            {"mm_processor_kwargs": {"num_frames": "many"}},
            "mm_processor_kwargs.num_frames",
            "integer",
        ),
    ],
)
def test_bad_values_name_the_parameter_they_came_from(fields: dict, param: str, text: str) -> None:
    error = _refusal(_request(**fields))
    assert (error.param, error.code) == (param, "invalid_request")
    assert text in error.message and f"`{param}`" in error.message


def test_bad_stts_values_are_refused_when_the_body_is_parsed() -> None:
    """Our own extension is validated with the body (a 400 from the request validator)."""
    with pytest.raises(ValueError, match="keep_ratio"):
        _request(stts={"keep_ratio": 0})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stts": {"num_frames": 65}}, "stts.num_frames"),
        ({"mm_processor_kwargs": {"num_frames": 65}}, "mm_processor_kwargs.num_frames"),
        ({"media_io_kwargs": {"video": {"num_frames": 4096}}}, "media_io_kwargs.video.num_frames"),
    ],
)
def test_frame_counts_over_the_server_limit_are_refused(fields: dict, param: str) -> None:
    error = _refusal(_request(**fields), max_frames=64)
    assert (error.param, error.code) == (param, "too_many_frames")
    assert "limit of 64 frames" in error.message


def test_a_frame_count_at_the_server_limit_is_taken() -> None:
    assert resolve_video_options(_request(stts={"num_frames": 64}), 64).num_frames == 64
    # without a server limit nothing is bounded here
    assert resolve_video_options(_request(stts={"num_frames": 4096})).num_frames == 4096


def test_a_clients_max_frames_is_lowered_to_the_servers_not_refused() -> None:
    assert resolve_video_options(_request(stts={"max_frames": 4096}), 64).max_frames == 64
    lowered = resolve_video_options(_request(mm_processor_kwargs={"max_frames": 100}), 64)
    assert lowered.max_frames == 64
    assert resolve_video_options(_request(stts={"max_frames": 8}), 64).max_frames == 8
    assert resolve_video_options(_request(stts={"max_frames": 4096})).max_frames == 4096
