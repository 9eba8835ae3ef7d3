"""Procedural video QA: deterministic by seed, generated on the fly, nothing stored.

Each sample is a short clip of grey backgrounds (flat, textured, panning, or with a scene cut)
with small saturated shapes, and a question whose one-word answer needs either one frame
(`color`) or time (`direction`, `order`, `count`, `changed`). Shapes cover a few LLM-token
units; backgrounds are grey, so "where the colour is" is the spatial cue a learned scorer can
pick up from the LLM's gradient, while panning backgrounds make every unit "change" and fool a
pure frame-difference score. `distractor` goes further: most units flicker black/white every
step, and for one step every unit but one turns into a block of colour while the answer (a
small shape's colour) shows in the one left, a smaller change than the flicker's or the
blocks', so a scorer that keeps what changes most keeps everything but the answer. The
`long` split hides one brief event in many frames, for test-time scaling; the `distractor`
split holds distractor questions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np

SIZE = 168  # 6 x 6 LLM-token units of 28 px per frame
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 215, 30),
}
COUNTS = ("one", "two", "three", "four")
TASKS = ("color", "direction", "order", "count", "changed", "flash", "distractor")
SPLIT_SEEDS = {
    "train": 0,
    "val": 10_000_000,
    "test": 20_000_000,
    "long": 30_000_000,
    "distractor": 40_000_000,
}
UNIT = 28  # pixels of one LLM-token unit (2 x 2 patches of 14)
FPS = 2.0


@dataclass(frozen=True)
class VideoQA:
    """One question about one clip. `answer` is a single word; the model answers with it."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    fps: float
    question: str
    answer: str
    task: str
    seed: int
    meta: dict = field(default_factory=dict, compare=False)  # where the answer is, for checks


def answer_words() -> list[str]:
    """Every answer any task can have: checkpoints must tokenize each to one token."""
    return [*COLORS, "left", "right", *COUNTS]


# --------------------------------------------------------------------------- backgrounds


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grey blobs: coarse noise upsampled, so panning moves visible structure."""
    cell = int(rng.integers(8, 20))
    coarse = rng.integers(40, 200, size=(height // cell + 2, width // cell + 2), dtype=np.uint8)
    grey = np.kron(coarse, np.ones((cell, cell), dtype=np.uint8))[:height, :width]
    return np.repeat(grey[..., None], 3, axis=2)


def _backgrounds(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    kind = rng.choice(["flat", "texture", "pan", "cut"], p=[0.2, 0.25, 0.35, 0.2])
    if kind == "flat":
        level = int(rng.integers(50, 200))
        return np.full((num_frames, SIZE, SIZE, 3), level, dtype=np.uint8)
    if kind == "texture":
        return np.repeat(_texture(rng, SIZE, SIZE)[None], num_frames, axis=0)
    if kind == "cut":
        first, second = _texture(rng, SIZE, SIZE), _texture(rng, SIZE, SIZE)
        cut = int(rng.integers(num_frames // 4, 3 * num_frames // 4 + 1))
        return np.stack([first if i < cut else second for i in range(num_frames)])
    speed = int(rng.integers(3, 9)) * int(rng.choice([-1, 1]))
    span = abs(speed) * num_frames
    wide = _texture(rng, SIZE, SIZE + span)
    starts = [
        (i * speed) % (span + 1) if speed > 0 else span + i * speed for i in range(num_frames)
    ]
    return np.stack([wide[:, s : s + SIZE] for s in starts])


# --------------------------------------------------------------------------- shapes


def _draw(frame: np.ndarray, shape: str, y: int, x: int, size: int, color: str) -> None:
    rgb = COLORS[color]
    if shape == "square":
        frame[y : y + size, x : x + size] = rgb
        return
    yy, xx = np.mgrid[0:size, 0:size]
    r = (size - 1) / 2
    disc = (yy - r) ** 2 + (xx - r) ** 2 <= r * r
    frame[y : y + size, x : x + size][disc] = rgb


def _unit(row: int, col: int) -> tuple[slice, slice]:
    """The pixels of LLM-token unit (row, col) in a frame."""
    return np.s_[row * UNIT : (row + 1) * UNIT, col * UNIT : (col + 1) * UNIT]


def _units_of(y: int, x: int, size: int) -> list[tuple[int, int]]:
    """The LLM-token units a `size`-pixel box at (y, x) touches, row-major."""
    rows = range(y // UNIT, (y + size - 1) // UNIT + 1)
    cols = range(x // UNIT, (x + size - 1) // UNIT + 1)
    return [(r, c) for r in rows for c in cols]


def _spot(rng: np.random.Generator, size: int, margin: int = 0) -> tuple[int, int]:
    lo, hi = margin, SIZE - size - margin
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _shape(rng: np.random.Generator) -> tuple[str, int]:
    return str(rng.choice(["square", "circle"])), int(rng.integers(20, 33))


# --------------------------------------------------------------------------- tasks


def _color(rng, frames):
    shape, size = _shape(rng)
    color = str(rng.choice(list(COLORS)))
    y, x = _spot(rng, size)
    vy, vx = (int(v) for v in rng.integers(-4, 5, size=2))
    for i, frame in enumerate(frames):
        yy = int(np.clip(y + vy * i, 0, SIZE - size))
        xx = int(np.clip(x + vx * i, 0, SIZE - size))
        _draw(frame, shape, yy, xx, size, color)
    return f"What color is the {shape}?", color


def _direction(rng, frames):
    shape, size = _shape(rng)
    color = str(rng.choice(list(COLORS)))
    way = str(rng.choice(["left", "right"]))
    n = len(frames)
    travel = SIZE - size - 8
    y = int(rng.integers(0, SIZE - size + 1))
    for i, frame in enumerate(frames):
        step = round(4 + travel * i / max(1, n - 1))
        x = step if way == "right" else SIZE - size - step
        _draw(frame, shape, y, x, size, color)
    return f"Which way does the {color} {shape} move, left or right?", way


def _order(rng, frames):
    n = len(frames)
    first, second = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    t1 = int(rng.integers(0, n // 2 - 1))
    t2 = int(rng.integers(t1 + 2, n - 1))
    for color, start in ((first, t1), (second, t2)):
        shape, size = _shape(rng)
        y, x = _spot(rng, size)
        for frame in frames[start:]:
            _draw(frame, shape, y, x, size, color)
    return "Which color appears first?", first


def _count(rng, frames):
    """Flashes last one temporal step (2 frames) and are at least one step apart."""
    n = len(frames)
    shape, size = _shape(rng)
    color = str(rng.choice(list(COLORS)))
    steps = n // 2
    count = int(rng.integers(1, min(4, steps // 2) + 1))
    # Steps 1..steps-1, pairwise at least 2 apart: pick from a shortened range, then spread.
    picks = sorted(int(c) for c in rng.choice(steps - count, size=count, replace=False))
    chosen = [1 + c + i for i, c in enumerate(picks)]
    y, x = _spot(rng, size)
    for s in chosen:
        for frame in frames[2 * s : 2 * s + 2]:
            _draw(frame, shape, y, x, size, color)
    return f"How many times does a {color} {shape} flash?", COUNTS[count - 1]


def _changed(rng, frames, period: int | None = None, alone: bool = False):
    """Two shapes, one changes colour once. The training-only warm-ups (`WARMUPS`) make the
    change louder. With a `period` the moved one swaps its two colours every `period` frames
    from the first: 1 puts both colours into every temporal patch of its units (a cue one
    token holds), 2 makes every pair of neighbouring temporal steps differ (a cue across time
    that many token pairs repeat). `alone` leaves the still shape out, so the answer is the
    side of the only shape there is. The draws are the same, so a warm-up clip is its plain
    clip with a louder change."""
    n = len(frames)
    size = int(rng.integers(22, 33))
    y = int(rng.integers(0, SIZE - size + 1))
    left_x = int(rng.integers(0, SIZE // 2 - size))
    right_x = int(rng.integers(SIZE // 2, SIZE - size + 1))
    before, after, other = (str(c) for c in rng.choice(list(COLORS), size=3, replace=False))
    side = str(rng.choice(["left", "right"]))
    change = int(rng.integers(2, n - 2))
    shape = str(rng.choice(["square", "circle"]))
    moved_x, still_x = (left_x, right_x) if side == "left" else (right_x, left_x)
    for i, frame in enumerate(frames):  # the two boxes never overlap: drawing order is moot
        first = i < change if period is None else (i // period) % 2 == 0
        _draw(frame, shape, y, moved_x, size, before if first else after)
        if not alone:
            _draw(frame, shape, y, still_x, size, other)
    meta = {
        "change": change if period is None else None,  # the first frame in the new colour
        "period": period,
        "alone": alone,
        "moved": {"box": (y, moved_x, size), "units": _units_of(y, moved_x, size)},
        "still": {"box": (y, still_x, size), "units": _units_of(y, still_x, size)},
        "colors": (before, after, other),
    }
    return f"Which {shape} changes color, left or right?", side, meta


def _flash(rng, frames):
    """One shape flashes for 2 frames (one temporal step), once. In the `long` split the clip
    is long and sampled sparsely: with too few frames the flash is missed, so spending
    pruning savings on more frames pays."""
    n = len(frames)
    shape, size = _shape(rng)
    color = str(rng.choice(list(COLORS)))
    start = int(rng.integers(1, n // 2 - 1)) * 2
    y, x = _spot(rng, size)
    for frame in frames[start : start + 2]:
        _draw(frame, shape, y, x, size, color)
    return f"What color is the {shape} that flashes?", color


def _distractor(rng, frames):
    """A small shape among decoys, in flicker: on a flat grey field, 55-75% of the 6 x 6 units
    (never the target's) flip between near-black and near-white every temporal step, each
    with its own phase. For one step (never the first, which every method keeps whole) every
    other unit turns into a block of colour filling the unit, the colours drawn from the same
    four as the answer, while the target's unit shows one small shape of the answer's colour
    on grey. The flicker changes a unit's pixels by ~190 levels a step and a decoy by more
    than the target does (the target covers part of its unit, by at most ~150), so ranking by
    change drops the target first. The decoys are what make selection matter: the blocks
    before the pruning point attend across units, and with a lone flash every kept neighbour
    carried its colour (random kept 50% of the units and lost nothing); among decoys of every
    colour a neighbour carries a mixture, and only the target's own unit says which colour is
    the answer's."""
    n = len(frames)
    level = int(rng.integers(110, 146))
    frames[:] = level
    grid = SIZE // UNIT
    target = (int(rng.integers(0, grid)), int(rng.integers(0, grid)))
    others = [(r, c) for r in range(grid) for c in range(grid) if (r, c) != target]
    flicker = [others[i] for i in rng.permutation(len(others))[: int(rng.integers(20, 27))]]
    for r, c in flicker:
        phase = int(rng.integers(0, 2))
        for i, frame in enumerate(frames):
            shade = 30 if (i // 2 + phase) % 2 else 220
            frame[_unit(r, c)] = shade
    shape = str(rng.choice(["square", "circle"]))
    size = int(rng.integers(14, 21))
    color = str(rng.choice(list(COLORS)))
    step = int(rng.integers(1, n // 2))
    colors = rng.choice(list(COLORS), size=len(others))
    decoys = {unit: str(c) for unit, c in zip(others, colors, strict=True)}
    y = target[0] * UNIT + int(rng.integers(0, UNIT - size + 1))
    x = target[1] * UNIT + int(rng.integers(0, UNIT - size + 1))
    for frame in frames[2 * step : 2 * step + 2]:
        for (r, c), decoy in decoys.items():
            frame[_unit(r, c)] = COLORS[decoy]
        _draw(frame, shape, y, x, size, color)
    meta = {
        "unit": target,
        "box": (y, x, size),
        "step": step,
        "flicker_units": flicker,
        "decoys": decoys,
    }
    return f"What color is the small {shape}?", color, meta


# Training-only louder forms of a task, for a curriculum (experiments/README.md, warm-ups): the
# small LLM stays at chance on plain `changed` for hundreds of steps however it is started,
# and a warm-up is the same question where the evidence is everywhere. Never in `TASKS`, so
# the test split's cycle never asks one; any mixed split answers one by name (val, to tell
# when it is learned).
WARMUPS = {
    "changed-flicker": partial(_changed, period=1),
    "changed-steps": partial(_changed, period=2),
    "changed-alone": partial(_changed, alone=True),
}

_MAKERS = {
    "color": _color,
    "direction": _direction,
    "order": _order,
    "count": _count,
    "changed": _changed,
    "flash": _flash,
    "distractor": _distractor,
    **WARMUPS,
}
TRAINABLE = tuple(_MAKERS)  # what a training mix may name: the tasks and their warm-ups


def make_sample(
    seed: int, split: str = "train", num_frames: int = 16, task: str | None = None
) -> VideoQA:
    """Sample `seed` of `split`; the same arguments always give the same pixels. The task
    cycles with the seed through `TASKS` unless `task` names one (a training mix that
    weights some tasks, or a warm-up from `WARMUPS`); the `long` and `distractor` splits
    have their own."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if num_frames < 8 or num_frames % 2:
        raise ValueError(f"num_frames must be an even number >= 8, got {num_frames}")
    if task is not None and (task not in TRAINABLE or split in ("long", "distractor")):
        raise ValueError(
            f"task must be one of {list(TRAINABLE)} on a mixed split, got {task!r} on {split!r}"
        )
    rng = np.random.default_rng(SPLIT_SEEDS[split] + seed)
    frames = _backgrounds(rng, num_frames).copy()
    meta: dict = {}
    if split == "long":
        question, answer = _flash(rng, frames)
        task = "long"
    else:
        task = "distractor" if split == "distractor" else task or TASKS[seed % len(TASKS)]
        made = _MAKERS[task](rng, frames)
        question, answer = made[:2]
        meta = made[2] if len(made) > 2 else {}
    fps = FPS * 4 if split == "long" else FPS  # long clips: 4x denser, subsampled later
    return VideoQA(frames, fps, question, answer, task, seed, meta)


def subsample(sample: VideoQA, num_frames: int) -> VideoQA:
    """Uniformly pick `num_frames` (even) of a clip's frames, as a server's sampler would;
    the fps follows, so M-RoPE time positions keep meaning seconds."""
    total = len(sample.frames)
    if num_frames >= total:
        return sample
    index = np.linspace(0, total - 1, num_frames).round().astype(int)
    fps = sample.fps * num_frames / total
    return VideoQA(
        sample.frames[index], fps, sample.question, sample.answer, sample.task, sample.seed
    )  # `meta` describes the full clip's frames, so it is not carried over


def samples(split: str, count: int, num_frames: int = 16, start: int = 0) -> Iterator[VideoQA]:
    for seed in range(start, start + count):
        yield make_sample(seed, split, num_frames)
