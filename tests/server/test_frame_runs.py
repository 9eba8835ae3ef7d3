"""`server.frame_runs`: which image parts of a message are one video's frames, at what times,
and which timestamps are refused (unit tests: no engine)."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import APIError
from server.frame_runs import FrameRun, frame_runs, frame_timestamp

WHERE = "messages.0.content"


def _image(n: int = 0) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{n}"}}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _frames(n: int, times: list[float] | None = None, fmt: str = "<{:g} seconds>") -> list:
    parts: list[Any] = []
    for i in range(n):
        if times is not None:
            parts.append(_text(fmt.format(times[i])))
        parts.append(_image(i))
    return parts


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("<12.5 seconds>", 12.5),
        ("<0 seconds>", 0.0),
        ("12.5s", 12.5),
        ("<3s>", 3.0),
        (" 7 sec ", 7.0),
        ("<1 second>", 1.0),
        ("<-2.0 seconds>", -2.0),
        ("What happens at 12.5s?", None),
        ("<12.5 minutes>", None),
        ("12.5", None),
        ("", None),
    ],
)
def test_a_timestamp_is_a_text_part_that_only_states_a_time(text: str, seconds) -> None:
    assert frame_timestamp(_text(text)) == seconds
    assert frame_timestamp(text) == seconds  # vLLM's bare-string parts alike


def test_non_text_parts_are_never_timestamps() -> None:
    assert frame_timestamp(_image()) is None
    assert frame_timestamp({"type": "text", "text": None}) is None


def test_auto_reads_a_run_of_at_least_k_images_as_one_video() -> None:
    parts = [*_frames(4), _text("What happens?")]
    assert frame_runs(parts, "auto", 4, WHERE) == [FrameRun(0, 4, (0, 1, 2, 3), None)]


def test_auto_leaves_a_run_below_k_as_images() -> None:
    assert frame_runs([*_frames(3), _text("?")], "auto", 4, WHERE) == []


def test_a_run_broken_by_ordinary_text_stays_images() -> None:
    parts = [_image(0), _image(1), _text("and then"), _image(2), _image(3)]
    assert frame_runs(parts, "auto", 4, WHERE) == []
    # `always` reads each unbroken run as its own video
    assert frame_runs(parts, "always", 4, WHERE) == [
        FrameRun(0, 2, (0, 1), None),
        FrameRun(3, 5, (3, 4), None),
    ]


def test_off_reads_nothing_and_always_reads_a_single_image() -> None:
    assert frame_runs(_frames(16), "off", 4, WHERE) == []
    assert frame_runs([_image()], "always", 4, WHERE) == [FrameRun(0, 1, (0,), None)]


def test_timestamps_before_each_frame_become_the_frames_times() -> None:
    """lmms-eval's Qwen3-VL message format: `<t seconds>` before every frame."""
    times = [0.0, 0.5, 1.0, 1.5, 2.0]
    parts = [_text("Watch:"), *_frames(5, times), _text("What happens?")]
    (run,) = frame_runs(parts, "auto", 4, WHERE)
    assert (run.start, run.stop, run.images) == (1, 11, (2, 4, 6, 8, 10))
    assert run.times == tuple(times)


@pytest.mark.parametrize("fmt", ["{:g}s", "<{:g}s>", "<{:g} seconds>"])
def test_every_timestamp_format_reads_alike(fmt: str) -> None:
    (run,) = frame_runs(_frames(4, [0, 1, 2, 3], fmt), "auto", 4, WHERE)
    assert run.times == (0.0, 1.0, 2.0, 3.0)


def test_a_trailing_timestamp_without_a_frame_stays_text() -> None:
    parts = [*_frames(4, [0, 1, 2, 3]), _text("<4 seconds>")]
    (run,) = frame_runs(parts, "auto", 4, WHERE)
    assert run.stop == 8


def test_a_repeated_last_timestamp_is_accepted() -> None:
    """lmms-eval pads a clip to an even frame count by repeating its last frame and time."""
    (run,) = frame_runs(_frames(4, [0.0, 1.0, 2.0, 2.0]), "auto", 4, WHERE)
    assert run.times == (0.0, 1.0, 2.0, 2.0)


def _refused(parts: list, text: str, param: str) -> None:
    with pytest.raises(APIError) as caught:
        frame_runs(parts, "auto", 4, WHERE)
    error = caught.value
    assert error.status == 400 and error.param == param
    assert text in error.message, error.message


def test_a_timestamp_that_goes_backwards_is_a_400_naming_the_part() -> None:
    _refused(_frames(4, [0.0, 2.0, 1.0, 3.0]), "goes back in time", f"{WHERE}.4")


def test_a_negative_timestamp_is_a_400_naming_the_part() -> None:
    _refused(_frames(4, [-1.0, 0.0, 1.0, 2.0]), "is negative", f"{WHERE}.0")


def test_timestamps_on_some_frames_only_are_a_400_naming_the_bare_frame() -> None:
    parts = [*_frames(3, [0.0, 1.0, 2.0]), _image(9)]
    _refused(parts, "no timestamp", f"{WHERE}.6")


def test_bad_timestamps_are_not_checked_where_the_run_stays_images() -> None:
    """Below K the parts are images and their text is the client's own business."""
    assert frame_runs(_frames(2, [5.0, 1.0]), "auto", 4, WHERE) == []
