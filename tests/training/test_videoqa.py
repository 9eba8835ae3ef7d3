"""The procedural video-QA data: deterministic, well-formed, answerable in one token."""

from __future__ import annotations

import numpy as np
import pytest

from stts_vllm.training.videoqa import (
    COLORS,
    SIZE,
    TASKS,
    UNIT,
    WARMUPS,
    answer_words,
    make_sample,
    subsample,
)


def test_same_seed_same_clip_and_splits_differ() -> None:
    a, b = make_sample(7, "train"), make_sample(7, "train")
    assert np.array_equal(a.frames, b.frames) and a.question == b.question
    assert not np.array_equal(a.frames, make_sample(7, "test").frames)


@pytest.mark.parametrize("frames", [8, 16, 32])
def test_every_task_makes_valid_samples(frames: int) -> None:
    seen = set()
    for seed in range(60):
        s = make_sample(seed, "train", frames)
        seen.add(s.task)
        assert s.frames.shape == (frames, SIZE, SIZE, 3) and s.frames.dtype == np.uint8
        assert s.answer in answer_words() and s.question.endswith("?")
    assert seen == set(TASKS)


def test_answers_are_balanced_enough_to_beat_chance_honestly() -> None:
    """No answer may dominate its task (a constant guesser would look smart otherwise)."""
    for task in TASKS:
        answers = [s.answer for s in (make_sample(i, "test") for i in range(400)) if s.task == task]
        top = max(answers.count(a) for a in set(answers))
        assert top / len(answers) < 1 / len(set(answers)) + 0.15, (task, top, len(answers))


def test_long_clips_hide_one_short_event() -> None:
    s = make_sample(3, "long", 64)
    assert s.task == "long" and s.answer in COLORS and s.fps == 8.0
    colored = [bool((np.ptp(f.astype(int), axis=-1) > 100).any()) for f in s.frames]
    assert sum(colored) == 2  # two frames = one temporal step
    short = subsample(s, 16)
    assert short.frames.shape[0] == 16 and short.fps == 2.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        make_sample(0, "nope")
    with pytest.raises(ValueError, match="num_frames"):
        make_sample(0, "train", 7)
    with pytest.raises(ValueError, match="task"):
        make_sample(0, "train", task="nope")
    with pytest.raises(ValueError, match="task"):
        make_sample(0, "distractor", task="color")  # that split asks one task only


def test_a_named_task_overrides_the_cycle_and_stays_deterministic() -> None:
    def same(a, b) -> bool:
        return np.array_equal(a.frames, b.frames) and (a.question, a.answer, a.task) == (
            b.question,
            b.answer,
            b.task,
        )

    cycled = make_sample(8, "train")  # seed 8 cycles to TASKS[1]
    assert cycled.task == TASKS[1]
    assert same(make_sample(8, "train", task=TASKS[1]), cycled)  # the cycle's own task: same
    named = make_sample(8, "train", task="changed")
    assert named.task == "changed" and same(named, make_sample(8, "train", task="changed"))
    assert named.question.startswith("Which") and named.answer in ("left", "right")


@pytest.mark.parametrize("seed", range(12))
def test_distractor_answer_is_where_its_metadata_says_and_changes_least_of_its_step(
    seed: int,
) -> None:
    s = make_sample(seed, "distractor")
    assert s.task == "distractor" and s.answer in COLORS
    meta, frames = s.meta, s.frames.astype(int)
    y, x, size = meta["box"]
    step, (row, col) = meta["step"], meta["unit"]
    assert 1 <= step < len(frames) // 2  # never in the first step, which every method keeps
    assert row * UNIT <= y and y + size <= (row + 1) * UNIT  # inside one LLM-token unit
    assert col * UNIT <= x and x + size <= (col + 1) * UNIT
    centre = frames[:, y + size // 2, x + size // 2]
    colored = [i for i in range(len(frames)) if np.ptp(centre[i]) > 100]
    assert colored == [2 * step, 2 * step + 1]
    assert tuple(centre[2 * step]) == COLORS[s.answer]

    def cell(r: int, c: int) -> tuple[slice, slice]:
        return np.s_[r * UNIT : (r + 1) * UNIT, c * UNIT : (c + 1) * UNIT]

    # At the flash step every other unit is one block of a decoy colour, of every colour in
    # the answer's set across the split; outside it, decoys' units are grey or flicker.
    decoys = meta["decoys"]
    assert len(decoys) == 35 and (row, col) not in decoys
    for (r, c), decoy in decoys.items():
        block = frames[2 * step][cell(r, c)].reshape(-1, 3)
        assert (block == COLORS[decoy]).all()
        assert np.ptp(frames[0][cell(r, c)]) == 0  # grey or flicker in the first frame
    assert np.ptp(frames[2 * step][cell(row, col)]) > 100  # grey around the shape

    def unit_change(r: int, c: int, a: int, b: int) -> float:
        return float(np.abs(frames[a][cell(r, c)] - frames[b][cell(r, c)]).mean())

    target = unit_change(row, col, 2 * step - 1, 2 * step)
    away = step + 2 if step + 2 < len(frames) // 2 else step - 1  # a transition without flash
    flicker = [unit_change(r, c, 2 * away - 1, 2 * away) for r, c in meta["flicker_units"]]
    decoy = [unit_change(r, c, 2 * step - 1, 2 * step) for r, c in decoys]
    assert len(flicker) >= 20 and min(flicker) > 150 > target > 0
    assert min(decoy) > target  # ranking the flash step's units by change drops the answer


def test_distractor_decoys_use_every_answer_color() -> None:
    """No answer can be had by elimination from the decoys' colours."""
    for seed in range(4):
        s = make_sample(seed, "distractor")
        assert set(s.meta["decoys"].values()) == set(COLORS)


def test_distractor_questions_are_in_the_mixed_splits_too() -> None:
    tasks = [make_sample(i, "test").task for i in range(len(TASKS))]
    assert "distractor" in tasks


@pytest.mark.parametrize("seed", range(8))
def test_changed_answer_is_the_shape_its_metadata_says_changes(seed: int) -> None:
    s = make_sample(seed, "val", task="changed")
    meta, frames = s.meta, s.frames.astype(int)
    before, after, other = (COLORS[c] for c in meta["colors"])
    change = meta["change"]
    assert 2 <= change < len(frames) - 2
    for key, colours in (("moved", (before, after)), ("still", (other, other))):
        y, x, size = meta[key]["box"]
        centre = frames[:, y + size // 2, x + size // 2]
        assert all(tuple(c) == colours[0] for c in centre[:change])
        assert all(tuple(c) == colours[1] for c in centre[change:])
        assert (y // UNIT, x // UNIT) in meta[key]["units"]
        assert ((y + size - 1) // UNIT, (x + size - 1) // UNIT) in meta[key]["units"]
    moved_x, still_x = meta["moved"]["box"][1], meta["still"]["box"][1]
    assert s.answer == ("left" if moved_x < still_x else "right")


@pytest.mark.parametrize("task", sorted(WARMUPS))
@pytest.mark.parametrize("frames", [8, 16])
def test_changed_warmups_are_their_plain_clip_with_a_louder_change(task: str, frames: int) -> None:
    """A warm-up is its plain clip with a louder change: the same shapes, places and answer;
    the moved shape swaps its two colours every `period` frames from the first (or changes
    once, as in the plain clip), and the still one is as it was, or absent (`alone`)."""
    for seed in range(4):
        plain, warm = (make_sample(seed, "val", frames, t) for t in ("changed", task))
        assert warm.task == task and (warm.question, warm.answer) == (plain.question, plain.answer)
        period, change = warm.meta["period"], warm.meta["change"]
        assert (period is None) == (change == plain.meta["change"])
        before, after, other = (COLORS[c] for c in warm.meta["colors"])
        y, x, size = warm.meta["moved"]["box"]
        centre = [tuple(c) for c in warm.frames[:, y + size // 2, x + size // 2].astype(int)]
        first = [i < change if period is None else (i // period) % 2 == 0 for i in range(frames)]
        assert centre == [before if f else after for f in first]
        y, x, size = warm.meta["still"]["box"]
        still = warm.frames[:, y + size // 2, x + size // 2]
        if warm.meta["alone"]:
            assert (np.ptp(still.astype(int), axis=-1) == 0).all()  # grey: background only
        else:
            assert {tuple(c) for c in still} == {other}
        assert warm.meta["moved"] == plain.meta["moved"]
        assert warm.meta["still"] == plain.meta["still"]


def test_warmups_never_come_up_in_the_cycle() -> None:
    tasks = {make_sample(i, "test").task for i in range(3 * len(TASKS))}
    assert tasks == set(TASKS) and not tasks & set(WARMUPS)
    with pytest.raises(ValueError, match="task"):
        make_sample(0, "distractor", task="changed-flicker")
