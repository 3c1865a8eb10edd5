"""What an evaluation by generation reports: the ``eval/gen/*`` numbers, its one console line, its plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from rayalign.evaluation.scoring import win_rate
from rayalign.metrics import gen_key
from rayalign.storage import replaced_whole

SIDES = ("policy", "reference")


def eval_numbers(records: list[dict[str, Any]], scored: bool) -> dict[str, Any]:
    """The ``eval/gen/*`` numbers: mean score and response length of each side, unscored responses, the win
    rate over the prompts whose every response was scored on both sides."""
    report: dict[str, Any] = {gen_key("prompts"): len(records)}
    for side in SIDES:
        report[gen_key("tokens", side)] = statistics.mean(r["tokens"] for rec in records for r in rec[side])
    if not scored:
        return report
    errors = [r["error"] for rec in records for side in SIDES for r in rec[side] if r.get("error")]
    report["first_error"] = errors[0] if errors else None
    report[gen_key("unscored_responses")] = sum(
        r["score"] is None for rec in records for side in SIDES for r in rec[side]
    )
    complete = [rec for rec in records if all(r["score"] is not None for side in SIDES for r in rec[side])]
    mean = {side: [statistics.mean(r["score"] for r in rec[side]) for rec in complete] for side in SIDES}
    for side in SIDES:
        report[gen_key("score", side)] = statistics.mean(mean[side]) if complete else None
    report[gen_key("unscored_prompts")] = len(records) - len(complete)
    if complete:
        wins = win_rate(mean["policy"], mean["reference"])
        report.update({gen_key(key): value for key, value in wins.as_dict().items() if key != "prompts"})
    return report


def evaluation_line(report: dict[str, Any]) -> str:
    """The one console line of an evaluation (the rest is in its files), or of its failure."""
    if "error" in report:
        return f"evaluate: failed ({report['error']}); the trained model is kept"
    n = report[gen_key("prompts")]
    tokens = f"{report[gen_key('tokens')]:.1f} vs {report[gen_key('tokens', 'reference')]:.1f} tokens"
    score_p, score_r = report.get(gen_key("score")), report.get(gen_key("score", "reference"))
    first_error = report.get("first_error")
    errors = f" (first: {first_error})" if first_error else ""
    if score_p is None or score_r is None:
        what = "not scored" if report.get("scorer") is None else f"no prompt scored on both sides{errors}"
        return f"evaluate: {n} prompts, {what}; {tokens}"
    wins = (
        f"win rate {report[gen_key('win_rate')]:.2f} [{report[gen_key('win_rate_low')]:.2f}, "
        f"{report[gen_key('win_rate_high')]:.2f}]"
    )
    unscored = report[gen_key("unscored_responses")]
    return (
        f"evaluate: {n} prompts, {report['scorer']} policy {score_p:.3g} vs reference {score_r:.3g}, {wins}; "
        f"{tokens}" + (f"; {unscored} response(s) unscored{errors}" if unscored else "")
    )


def plot_evaluation(report: dict[str, Any], records: list[dict[str, Any]], path: Path) -> Path:
    """Mean score of each side with the win rate and its interval, and the response lengths of each side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    scores = [report.get(gen_key("score", side)) for side in SIDES]
    if all(s is not None for s in scores):
        left.bar(SIDES, scores, color=["tab:blue", "tab:gray"])
        left.set_ylabel(f"mean score ({report['scorer']})")
        rate = report.get(gen_key("win_rate"))
        if rate is not None and not math.isnan(rate):
            low, high = report[gen_key("win_rate_low")], report[gen_key("win_rate_high")]
            left.set_title(f"win rate {rate:.2f} [{low:.2f}, {high:.2f}]")
    else:
        left.text(0.5, 0.5, "not scored", ha="center", va="center")
    for side, color in zip(SIDES, ("tab:blue", "tab:gray")):
        right.hist([r["tokens"] for rec in records for r in rec[side]], bins=20, alpha=0.6, label=side, color=color)
    right.set_xlabel("response length (tokens)")
    right.legend()
    fig.tight_layout()
    with replaced_whole(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path
