"""Sweep CPO's target margin γ from a reference that prefers the wrong answers.

The reference is the tiny model of ``jobs/configs/sweep-gamma.yaml`` fine-tuned toward the
rejected (wrong) answers of the synthetic arithmetic task, so δ_ref < 0 on most pairs: the
case where DPO's loss falls while the policy keeps preferring the rejected answer. The
sweep (Ray Tune, one Ray Train + DeepSpeed run per trial, ASHA early stopping) shows how
held-out absolute preference accuracy (δ_θ > 0) changes with γ; γ → −∞ is DPO.

    python jobs/sweep_gamma.py [--set key=value ...] [--fresh]
    ray job submit --working-dir . -- python jobs/sweep_gamma.py

Results in <output.root>/<output.name>/: sweep_results.csv, best_config.yaml,
objective_vs_gamma.png, sweep_summary.json, and results.md (the table for the README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rayalign.config import RayConfig
from rayalign.runtime import bind_local_cluster_to_loopback

# Before anything imports Ray: a cluster this script starts listens on 127.0.0.1 only (ray.loopback_only).
bind_local_cluster_to_loopback(RayConfig())

from biased_reference import biased_reference  # noqa: E402  # jobs/biased_reference.py, beside this script

from rayalign.cli import add_overrides
from rayalign.config import load_config
from rayalign.metrics import ABSOLUTE_ACCURACY, FRAC_IN_U, LOSS, REWARD_ACCURACY, eval_key
from rayalign.runtime import init_ray
from rayalign.storage import publish
from rayalign.tune.sweep import format_sweep_table, run_sweep

CONFIG = Path(__file__).resolve().parent / "configs" / "sweep-gamma.yaml"


def markdown_table(summary: dict) -> str:
    """One row per γ, in γ order: what the README shows."""
    lines = [
        "| γ | status | steps | held-out abs pref acc (δ_θ > 0) | held-out reward acc | held-out frac in U "
        "| held-out loss |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for t in sorted(summary["trials"], key=lambda t: t["params"]["loss.gamma"]):
        m = t["metrics"]
        lines.append(
            f"| {t['params']['loss.gamma']:g} | {t['status'].replace('_', ' ')} | {t['steps']} "
            f"| {cell(m[eval_key(ABSOLUTE_ACCURACY)])} | {cell(m[eval_key(REWARD_ACCURACY)])} "
            f"| {cell(m[eval_key(FRAC_IN_U)])} | {cell(m[eval_key(LOSS)])} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_overrides(parser, of="keys of jobs/configs/sweep-gamma.yaml")
    parser.add_argument("--bias-steps", type=int, default=200, help="fine-tuning steps toward the wrong answers")
    parser.add_argument("--fresh", action="store_true", help="discard an unfinished sweep instead of resuming it")
    args = parser.parse_args()

    base = load_config(CONFIG, args.overrides)
    init_ray(base.ray)
    reference = biased_reference(base, steps=args.bias_steps)
    cfg = load_config(CONFIG, args.overrides + ["model.tiny=null", f"model.path={reference}"])
    summary = run_sweep(cfg, fresh=args.fresh)

    table = markdown_table(summary)
    results = cfg.output.run_dir / "results.md"
    results.write_text(table + "\n")
    publish(cfg.output, results)
    print("\n" + format_sweep_table(summary))
    print("\n" + table)
    print(
        f"\nresults: {summary['files']['csv']}  plot: {summary['files']['plot']}  "
        f"best config: {summary['files']['best_config']}"
    )
    return 1 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
