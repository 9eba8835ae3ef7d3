"""`run_eval`: the rows an `EvalConfig` asks for, run, printed and written as a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stts_vllm.eval.config import EvalConfig
from stts_vllm.eval.modes import Mode, clips, default_modes, other_selections, server_modes
from stts_vllm.eval.report import per_task_table, table, write_report
from stts_vllm.eval.runners import HTTPRunner, OfflineRunner, Runner, hf_agreement, run_modes


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Prints the tables, writes OUT/eval.json and OUT/eval.png, returns the report."""
    runner: Runner
    if config.server:  # a server runs its own rows (its checkpoint's method at each ratio)
        runner = HTTPRunner(config.server, config.api_key)
        modes = server_modes(config.ratios, config.long)
    else:
        selections = config.selections
        if selections is None:
            selections = other_selections(config.checkpoint)
        modes = [
            m
            for m in default_modes(config.ratios, selections)
            if m.method in config.methods
            and (config.long or m.split != "long")
            and (config.distractor or m.split != "distractor")
        ]
        runner = OfflineRunner(config.checkpoint)
    results = run_modes(runner, modes, config.samples)
    print(table(results))
    print()
    print(per_task_table(results))
    meta: dict[str, Any] = {
        "checkpoint": str(config.checkpoint),
        "via": config.server or "offline vLLM",
        "title": f"procedural video QA, {config.samples} questions per row",
    }
    if config.compare_hf:
        target = next((r for r in results if r.mode == Mode("learned", 0.5)), None)
        if target is not None:
            n = min(config.compare_hf, target.total)
            agree = hf_agreement(
                config.checkpoint, target.mode, clips(target.mode, n), target.answer_ids[:n]
            )
            print(
                f"HF training model vs vLLM, {agree['mode']}: "
                f"{agree['same_answers']}/{agree['samples']} same greedy answers"
            )
            meta["hf_agreement"] = {k: v for k, v in agree.items() if k != "hf_answer_ids"}
    report = write_report(results, config.out, meta)
    print(f"wrote {Path(config.out) / 'eval.json'} and eval.png")
    return report
