"""Why *changed* falls under pruning: what each scorer keeps of a *changed* clip, and what an
oracle that keeps every unit of both shapes gets.

    .venv/bin/python -m experiments.probe_changed artifacts/quality-curriculum/seed-0/checkpoint \
        --out artifacts/probe-changed/curriculum-0

A *changed* clip is two static shapes, one of which changes colour once; everything the
answer needs is in the shapes' units. If the learned scorer loses the question where keep 1.0
answers it, two things can be at fault, and this probe separates them:

- the selection: the share of each kind of unit a scorer keeps (after the first step, which
  every method keeps whole): the moved shape before, at and after its change step, the still
  shape, the background; the generator's metadata says which unit is which;
- the model: the `oracle` selection keeps every unit of both shapes at every step and fills
  the rest of the budget at random. If it falls too, the model cannot read the question from
  a pruned clip, whatever a scorer keeps.

Clips are validation *changed* questions (seeds 0..N-1, 16 frames), greedy first answer word
on the training model's path. Prints one JSON line per (selection, keep) and writes
`probe.json` + `probe.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stts_vllm.core.selection import retention_mask
from stts_vllm.training.model import STTSVideoQAModel
from stts_vllm.training.videoqa import SIZE, UNIT, VideoQA, make_sample

SELECTIONS = ("learned", "heuristic", "random", "oracle")
ROLES = ("moved before", "moved at change", "moved after", "still", "background")
GRID = SIZE // UNIT


def unit_roles(sample: VideoQA, steps: int) -> np.ndarray:
    """`[steps, GRID * GRID]` index into `ROLES` of every unit of a *changed* clip."""
    change_step = sample.meta["change"] // 2  # the first step that shows the new colour
    roles = np.full((steps, GRID * GRID), ROLES.index("background"))
    for r, c in sample.meta["still"]["units"]:
        roles[:, r * GRID + c] = ROLES.index("still")
    for r, c in sample.meta["moved"]["units"]:
        for t in range(steps):
            phase = "before" if t < change_step else "at change" if t == change_step else "after"
            roles[t, r * GRID + c] = ROLES.index(f"moved {phase}")
    return roles


class OracleScorer(nn.Module):
    """Scores 1.0 for every unit of both shapes, a uniform draw in [0.1, 0.9] elsewhere: the
    top-k keeps the shapes whole and fills the rest of the budget at random."""

    def __init__(self, sample: VideoQA, seed: int) -> None:
        super().__init__()
        self.units = [r * GRID + c for r, c in sample.meta["moved"]["units"]]
        self.units += [r * GRID + c for r, c in sample.meta["still"]["units"]]
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        scores = torch.rand(units.shape[:2], generator=self.generator) * 0.8 + 0.1
        scores[:, self.units] = 1.0
        return scores.to(units.device)


def run_selection(
    model: STTSVideoQAModel, selection: str, samples: list[VideoQA], keep: float
) -> dict[str, float]:
    """Accuracy and the share of each role's units kept, for one selection at one ratio;
    `model` carries the selection's scorer kind (`oracle`: any, its scorer is swapped)."""
    learned = model.scorer
    kept, total = np.zeros(len(ROLES)), np.zeros(len(ROLES))
    correct = 0
    with torch.no_grad():
        try:
            for seed, sample in enumerate(samples):
                if selection == "oracle":
                    model.scorer = OracleScorer(sample, seed)
                out = model([model.prepare(sample)], [keep])
                word = model.tokenizer.decode([int(out.answer_logits[0].argmax())]).strip()
                correct += word == sample.answer
                scores = out.scores[0]
                if scores is None:  # keep 1.0: nothing scored, everything kept
                    continue
                mask = retention_mask(scores.cpu(), keep).numpy()[1:]
                roles = unit_roles(sample, scores.shape[0])[1:]
                for i in range(len(ROLES)):
                    kept[i] += mask[roles == i].sum()
                    total[i] += (roles == i).sum()
        finally:
            model.scorer = learned
    result = {"accuracy": correct / len(samples)}
    if total.any():
        result |= {f"kept/{r}": float(kept[i] / max(total[i], 1)) for i, r in enumerate(ROLES)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5])
    parser.add_argument("--selections", nargs="+", choices=SELECTIONS, default=list(SELECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = [make_sample(s, "val", 16, "changed") for s in range(args.clips)]
    models: dict[str, STTSVideoQAModel] = {}

    def model_for(selection: str) -> STTSVideoQAModel:
        kind = "learned" if selection in ("oracle", "none") else selection
        if kind not in models:
            models[kind] = STTSVideoQAModel.from_checkpoint(args.checkpoint, scorer=kind).eval()
        return models[kind]

    rows = []
    for keep in tqdm(args.keep, desc="keep ratios"):
        for selection in args.selections if keep < 1.0 else ["none"]:  # keep 1.0: none pruned
            result = run_selection(model_for(selection), selection, samples, keep)
            rows.append({"selection": selection, "keep": keep, **result})
            print(
                json.dumps(
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}
                )
            )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(args.checkpoint), "clips": args.clips, "rows": rows}
    (args.out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "probe.png", f"changed clips ({args.clips}): {args.checkpoint}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    full = [r["accuracy"] for r in rows if r["selection"] == "none"]
    for selection in SELECTIONS:
        mine = [r for r in rows if r["selection"] == selection]
        if mine:
            left.plot(
                [r["keep"] for r in mine], [r["accuracy"] for r in mine], "o-", label=selection
            )
    if full:
        left.axhline(full[0], color="k", ls="--", label="keep 1.0")
    left.axhline(0.5, color="grey", ls=":", label="chance")
    left.set(xlabel="keep ratio", ylabel="accuracy", title="answer")
    left.legend()
    pruned = [r for r in rows if "kept/background" in r and r["selection"] != "oracle"]
    width = 0.8 / max(len(pruned), 1)
    for i, row in enumerate(pruned):
        x = np.arange(len(ROLES)) + i * width
        right.bar(
            x, [row[f"kept/{r}"] for r in ROLES], width, label=f"{row['selection']}@{row['keep']}"
        )
    right.set_xticks(np.arange(len(ROLES)) + 0.4 - width / 2, ROLES, rotation=20)
    right.set(ylabel="share of units kept (steps 1+)", title="what each scorer keeps")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
