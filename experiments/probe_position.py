"""Where does left/right get lost? Linear probes on a trained checkpoint's *direction* clips.

    .venv/bin/python -m experiments.probe_position artifacts/quality3/seed-0/checkpoint \
        --out artifacts/probe-position/qwen2_5

Models trained on the default mix do not answer *direction* or *changed* (which side): each
says one word to every question. Two places can lose the side: the vision tower (the shape's
merged token does not carry its column, and the LLM's M-RoPE width rotation is too slow to
tell columns apart) or the LLM (the token carries it, the answer never reads it). A linear
probe on each answers it:

- `token`: the merged video token that holds the shape in the first temporal step (the side
  the shape starts on is the answer), exactly as the LLM receives it: its side, and the
  shape's colour as a positive control (the model answers *color* 100%). The shape starts in
  the first or the last column, so side = column.
- `track mean`: the shape's token averaged over every step. The shape crosses the whole
  width either way, so this mean carries the direction only if single tokens encode the
  motion itself (each token sees two frames); if it is at chance, answering needs attention
  that picks out one step.
- `llm/<layer>`: the LLM's hidden state at the row that predicts the answer word, after the
  input embeddings (`0`) and after each decoder layer.

Each probe is an L2-regularised logistic regression fit on `--fit` clips and scored on the
next `--held-out` clips (test split, direction questions only); chance is the majority class
of the held-out labels. `variance_share` is the share of the features' raw variance between the
label's class means: a label can be separable yet quiet, and a quiet feature is slow to learn.
Prints one JSON line per probe and writes `probe.json` + `probe.png`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stts_vllm.training.model import STTSVideoQAModel
from stts_vllm.training.videoqa import COLORS, SIZE, make_sample


def shape_box(frame: np.ndarray) -> tuple[float, float]:
    """Centre (y, x) in pixels of the saturated pixels: the only colour on a grey clip."""
    rgb = frame.astype(np.int16)
    saturated = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 100
    ys, xs = np.nonzero(saturated)
    if len(xs) == 0:
        raise ValueError("no coloured shape in the first frame")
    return float(ys.mean()), float(xs.mean())


def fit_probe(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    weight_decay: float = 1e-2,
) -> dict[str, float]:
    """Standardised features, multinomial logistic regression by L-BFGS; held-out accuracy."""
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    classes = int(max(y_fit.max(), y_test.max())) + 1
    linear = torch.nn.Linear(x_fit.shape[1], classes, dtype=torch.float64)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x_fit), y_fit)
        loss = loss + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        fit_acc = (linear(x_fit).argmax(1) == y_fit).double().mean().item()
        test_acc = (linear(x_test).argmax(1) == y_test).double().mean().item()
    chance = torch.bincount(y_test, minlength=classes).max().item() / len(y_test)
    return {"held_out": test_acc, "fit": fit_acc, "chance": chance}


def between_class_share(x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the features' total variance (raw scale, as the LLM's weights see them) that
    lies between the class means: how loud a label is, where the probe says how separable."""
    centred = x - x.mean(0)
    between = sum(
        (y == c).sum() * (x[y == c].mean(0) - x.mean(0)).square().sum() for c in y.unique()
    )
    total = centred.square().sum()
    return float(between / total) if total > 0 else 0.0  # constant features: nothing to share


@torch.no_grad()
def collect(model: STTSVideoQAModel, samples: Sequence) -> dict[str, torch.Tensor]:
    """Per clip: the shape's first-step token, the answer row's state at every LLM depth, and
    the labels (side, colour)."""
    language = model.hf.model.language_model
    captured: dict[str, torch.Tensor] = {}

    def grab_inputs(_module, _args, kwargs, _output):
        captured["inputs"] = kwargs["inputs_embeds"][0].double()

    def grab_layer(index: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[f"layer{index}"] = hidden[0].double()

        return hook

    handles = [language.register_forward_hook(grab_inputs, with_kwargs=True)]
    handles += [
        layer.register_forward_hook(grab_layer(i)) for i, layer in enumerate(language.layers)
    ]
    rows: dict[str, list] = {"token": [], "track": [], "side": [], "color": []}
    depth = len(language.layers)
    for d in range(depth + 1):
        rows[f"llm/{d}"] = []
    colors = list(COLORS)
    try:
        for sample in tqdm(samples, desc="clips", mininterval=5):
            item = model.prepare(sample)
            model.forward([item], [1.0])
            _, h, w = item.grid
            units_h, units_w = h // model.unit, w // model.unit
            ids = [*item.prefix, *model._video_span(item, None)]
            video_rows = [i for i, t in enumerate(ids) if t == model.video_pad]
            track = []  # the shape's token in every step: what uniform attention would read
            for step in range(item.grid[0]):
                ty, tx = shape_box(sample.frames[2 * step])
                r = min(int(ty * units_h / SIZE), units_h - 1)
                c = min(int(tx * units_w / SIZE), units_w - 1)
                track.append(captured["inputs"][video_rows[(step * units_h + r) * units_w + c]])
            rows["track"].append(torch.stack(track).mean(0))
            rows["token"].append(track[0])  # step 0 starts at frame 0: where the answer is
            answer_row = len(ids) + len(item.suffix) - 1
            rows["llm/0"].append(captured["inputs"][answer_row])
            for d in range(depth):
                rows[f"llm/{d + 1}"].append(captured[f"layer{d}"][answer_row])
            rows["side"].append(int(shape_box(sample.frames[0])[1] >= SIZE / 2))
            rows["color"].append(colors.index(sample.question.split()[4]))
    finally:
        for handle in handles:
            handle.remove()
    return {
        k: torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v)
        for k, v in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fit", type=int, default=400)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = STTSVideoQAModel.from_checkpoint(args.checkpoint, scorer="heuristic").eval()
    samples = [make_sample(s, "test", task="direction") for s in range(args.fit + args.held_out)]
    data = collect(model, samples)
    n = args.fit

    def probe(features: str, label: str) -> dict[str, float]:
        x, y = data[features], data[label]
        return fit_probe(x[:n], y[:n], x[n:], y[n:]) | {"variance_share": between_class_share(x, y)}

    results: dict[str, dict[str, float]] = {}
    for label in ("side", "color"):
        results[f"token -> {label}"] = probe("token", label)
    results["track mean -> side"] = probe("track", "side")
    for key in sorted(k for k in data if k.startswith("llm/")):
        results[f"{key} -> side"] = probe(key, "side")
    report = {
        "checkpoint": str(args.checkpoint),
        "clips": {"fit": args.fit, "held_out": args.held_out},
        "probes": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        print(json.dumps({"probe": name, **{k: round(v, 3) for k, v in result.items()}}))
    plot(results, args.out / "probe.png", str(args.checkpoint))


def plot(results: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.5))
    ys = np.arange(len(names))
    ax.barh(ys, [results[k]["held_out"] * 100 for k in names], color="tab:blue", label="held out")
    ax.scatter(
        [results[k]["chance"] * 100 for k in names],
        ys,
        color="k",
        marker="|",
        s=200,
        label="chance (majority)",
        zorder=3,
    )
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("linear-probe accuracy, %")
    ax.set_title(f"direction clips: {title}", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
