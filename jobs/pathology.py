"""Reproduce DPO's pathological convergence, and CPO preventing it.

Part (a), exact: one prompt, two responses, π_ref(y_w) = 0.1, labels prefer y_w with
probability 0.7, β = 1. The population DPO optimum is δ ≈ −1.350 (π(y_w) ≈ 0.206,
loss ≈ 0.611): DPO settles on y_l. The table lists each loss variant's optimum and, for
CPO, the smallest γ that reaches δ > 0.

Part (b), language model: a tiny reference is fine-tuned toward the rejected answers of
the synthetic arithmetic task (chosen = correct sum), then DPO and CPO are trained from it
on the same pairs with the platform's full pipeline (Ray Data → reference actors → Ray
Train + DeepSpeed), over several seeds. The metrics files show DPO's loss falling while
absolute preference stays wrong on a clear share of pairs, and CPO ending higher.

    python jobs/pathology.py                      # full: 3 seeds
    python jobs/pathology.py --reduced            # CI: 1 seed, 1 epoch
    ray job submit --working-dir . -- python jobs/pathology.py

Results: <out>/results.md (Markdown tables), <out>/results.json, <out>/dpo-vs-cpo.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rayalign.config import RayConfig
from rayalign.runtime import bind_local_cluster_to_loopback

# Before anything imports Ray: a cluster this script starts listens on 127.0.0.1 only (ray.loopback_only).
bind_local_cluster_to_loopback(RayConfig())

from biased_reference import biased_reference  # noqa: E402  # jobs/biased_reference.py, beside this script

from rayalign.cli import add_overrides
from rayalign.config import load_config
from rayalign.diagnostics.pathology import format_table, two_response_table
from rayalign.diagnostics.report import plot_runs
from rayalign.metrics import ABSOLUTE_ACCURACY, ALARM, FRAC_IN_U, LOSS, REWARD_ACCURACY, STEP, eval_key, gen_key
from rayalign.pipeline import run_train
from rayalign.runtime import init_ray
from rayalign.storage import METRICS_FILE, SUMMARY_FILE, read_jsonl, storage_root, upload

HERE = Path(__file__).resolve().parent
LM_CONFIG = HERE / "configs" / "pathology-lm.yaml"
# CPO: the target margin γ = 1 nat, the constraint at full weight (α = 1) and smoothness τ = 1, β as DPO's.
CPO_LOSS = ["loss.type=cpo", "loss.gamma=1.0", "loss.alpha=1.0", "loss.tau=1.0"]
# What each run of part (b) sets: DPO alone; CPO from the start; DPO that switches to the same CPO when the
# pathology alarm fires (monitor.on_alarm: switch); DPO that stops there and exports its best held-out model.
VARIANTS = {
    "dpo": ["loss.type=dpo"],
    "cpo": CPO_LOSS,
    "switch": [
        "loss.type=dpo",
        "monitor.on_alarm=switch",
        "monitor.switch_to={type: cpo, beta: 1.0, gamma: 1.0, alpha: 1.0, tau: 1.0}",
    ],
    "stop": ["loss.type=dpo", "monitor.on_alarm=stop"],
}


def part_a() -> tuple[list[dict], str]:
    rows = two_response_table(beta=1.0, ref_prob_chosen=0.1, label_prob=0.7)
    return rows, format_table(rows)


def _run_summary(run_dir: Path, tail: int = 4) -> dict:
    """Train metrics averaged over the first and last few steps (single batches are noisy under
    label noise) and the final held-out metrics."""
    rows = read_jsonl(run_dir / METRICS_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())

    def mean(key: str, part: list[dict]) -> float:
        return statistics.mean(r[key] for r in part)

    heldout, generation = summary["heldout"], summary["generation"]
    return {
        "loss_first": mean(LOSS, rows[:tail]),
        "loss_last": mean(LOSS, rows[-tail:]),
        "abs_acc_last": mean(ABSOLUTE_ACCURACY, rows[-tail:]),
        "frac_in_U_last": mean(FRAC_IN_U, rows[-tail:]),
        "eval_loss": heldout[eval_key(LOSS)],
        "eval_reward_acc": heldout[eval_key(REWARD_ACCURACY)],
        "eval_abs_acc": heldout[eval_key(ABSOLUTE_ACCURACY)],
        "eval_frac_in_U": heldout[eval_key(FRAC_IN_U)],
        "alarm_steps": sum(ALARM in r for r in rows),
        "logged_steps": len(rows),
        "action_steps": [a[STEP] for a in summary["actions"]],
        # A stop (or monitor.keep_best) exports the best held-out model: its value, not the last evaluation's.
        "exported_abs_acc": summary["exported"].get("value", heldout[eval_key(ABSOLUTE_ACCURACY)]),
        # The exported model's and the reference's greedy answers to the held-out prompts, checked (arithmetic).
        "gen_correct": generation[gen_key("score")],
        "gen_reference_correct": generation[gen_key("score", "reference")],
        "gen_win_rate": generation[gen_key("win_rate")],
    }


def part_b(
    seeds: list[int], epochs: int, bias_steps: int, overrides: list[str], variants: tuple[str, ...] = tuple(VARIANTS)
) -> dict:
    base = load_config(LM_CONFIG, overrides + [f"train.epochs={epochs}"])
    out_root = Path(base.output.root).expanduser().resolve()
    init_ray(base.ray)
    biased = biased_reference(base, steps=bias_steps)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    run_dirs: dict[str, list[Path]] = {name: [] for name in variants}
    for seed in seeds:
        for loss in variants:
            cfg = load_config(
                LM_CONFIG,
                overrides
                + [
                    f"train.epochs={epochs}",
                    "model.tiny=null",
                    f"model.path={biased}",
                    *VARIANTS[loss],
                    f"train.seed={seed}",
                    f"data.seed={seed}",
                    f"output.name={loss}-seed{seed}",
                    "output.if_exists=replace",  # the job's own runs: running it again replaces them
                ],
            )
            run_train(cfg)
            run_dirs[loss].append(cfg.output.run_dir)
            runs[loss].append({"seed": seed, **_run_summary(cfg.output.run_dir)})
    figure = plot_runs([dirs[0] for dirs in run_dirs.values()], out_root / "dpo-vs-cpo.png")  # the first seed
    return {"reference": str(biased), "bias_steps": bias_steps, "epochs": epochs, "runs": runs, "figure": str(figure)}


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def format_part_b(result: dict) -> str:
    """Mean ± sd over seeds; train columns average the first/last 4 steps, held-out is the final evaluation;
    generated answers are the exported model's greedy answers to the held-out prompts, checked."""
    lines = [
        "| run | seeds | train loss first → last | held-out loss | held-out reward acc "
        "| held-out abs pref acc (δ_θ > 0) | held-out frac in U | exported model's held-out abs acc "
        "| generated answers correct | win rate over the reference | steps with alarm | action at step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs_by_variant = result["runs"]
    first = next(iter(runs_by_variant.values()))
    seeds = ",".join(str(r["seed"]) for r in first)
    # The reference answers the same held-out prompts in every run of a seed: its row, once.
    reference = _mean_sd([r["gen_reference_correct"] for r in first])
    lines.append(f"| reference (biased) | {seeds} | | | | | | | {reference} | | | |")
    for loss, runs in runs_by_variant.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        keys = ("eval_loss", "eval_reward_acc", "eval_abs_acc", "eval_frac_in_U", "exported_abs_acc")
        keys += ("gen_correct", "gen_win_rate")
        cells = [_mean_sd([r[k] for r in runs]) for k in keys]
        alarms = ", ".join(f"{r['alarm_steps']}/{r['logged_steps']}" for r in runs)
        acted = ", ".join(",".join(map(str, r["action_steps"])) or "-" for r in runs)
        lines.append(
            f"| {loss} | {seeds} | {_mean_sd([r['loss_first'] for r in runs])} → "
            f"{_mean_sd([r['loss_last'] for r in runs])} "
            f"| {' | '.join(cells)} | {alarms} | {acted} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="CI size: part (b) with 1 seed and 1 epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bias-steps", type=int, default=200)
    add_overrides(parser, of="keys of jobs/configs/pathology-lm.yaml")
    args = parser.parse_args()
    seeds, epochs = ([args.seeds[0]], 1) if args.reduced else (args.seeds, args.epochs)

    rows_a, table_a = part_a()
    print("Part (a): exact two-response case (π_ref(y_w)=0.1, q=0.7, β=1)\n" + table_a, flush=True)
    result_b = part_b(seeds, epochs, args.bias_steps, args.overrides)
    table_b = format_part_b(result_b)
    print("\nPart (b): tiny LM, reference biased toward rejected answers\n" + table_b, flush=True)

    output = load_config(LM_CONFIG, args.overrides).output
    out_root = Path(output.root).expanduser().resolve()
    (out_root / "results.json").write_text(json.dumps({"part_a": rows_a, "part_b": result_b}, indent=2))
    (out_root / "results.md").write_text(
        "## Part (a)\n\n" + table_a + "\n\n## Part (b)\n\n" + table_b + f"\n\nFigure: {result_b['figure']}\n"
    )
    kept = out_root
    if output.storage is not None:  # each run is in storage already; the comparison goes beside them
        kept = storage_root(output)
        for name in ("results.json", "results.md", Path(result_b["figure"]).name):
            upload(out_root / name, kept / name)
    print(f"\nresults: {kept / 'results.md'}  figure: {kept / Path(result_b['figure']).name}")


if __name__ == "__main__":
    main()
