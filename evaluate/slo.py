"""Accuracy under latency objectives: the TLM-planned plan against baselines, on the report parts.

Every strategy picks one (prompt ratio, level) per question and SLO; the answer at that point comes from the
grid (evaluate/grid.py: the compiled LLM run at every point, prompts compressed by the compiled TLM), and
whether it meets the SLO from the planner's prediction (latency.json plus the TLM's measured cost, which only
the strategies that run the TLM pay). Strategies:

elastilm (TLM-planned), model-only, prompt-only and the smallest level (runtime_py.planner.STRATEGIES; "full",
the full model always, is left out here: it meets none of these SLOs).

Reported per SLO, strategy and task: accuracy, SLO attainment (predicted), and "accuracy within SLO": the share
of questions answered correctly by a plan that meets the SLO (a miss counts as a failure), the headline.
Output: slo-plans.csv (one row per question, SLO and strategy), slo.csv, slo.md and slo.png.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from elastilm.evaluate import grid
from elastilm.runtime_py import planner
from elastilm.runtime_py.planner import STRATEGIES

PAPER_SLOS = ((0.8, 0.9), (0.6, 0.8), (0.4, 0.7), (0.2, 0.6), (0.2, 0.5))  # <TTFT, TPOT> fractions (the paper)
EVALUATED = ("elastilm", "model-only", "prompt-only", "smallest")


def evaluate(
    build: Path, task_names: list[str], limit: int | None, out: Path, slos=PAPER_SLOS, progress: bool = True
) -> list[dict]:
    """Fill the report grid (resumable), then score every strategy at every SLO; returns the summary rows."""
    from elastilm.runtime_py.engine import ElasticEngine
    from elastilm.runtime_py.tlm import CompiledTLM

    build, out = Path(build), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tlm = CompiledTLM(build / "tlm")
    latency = planner.LatencyModel.from_file(build / "latency.json")
    engine = ElasticEngine(build, progress=progress)
    rows = grid.run_grid(
        engine, tlm, task_names, "report", tlm.ratios, tlm.levels, limit, out / "grid-report.csv", progress
    )
    cost = tlm.measure_cost()
    outcome: dict[tuple, dict] = {}
    original: dict[tuple, int] = {}
    for r in rows:
        outcome.setdefault((r["task"], r["id"]), {})[(r["ratio"], r["level"])] = r["correct"]
        original[(r["task"], r["id"])] = r["original"]
    plans = []
    for t in task_names:
        for it in grid.questions(t, "report", limit):
            key = (t, it.id)
            query_tokens = len(engine.encode(it.question))
            for ttft, tpot in slos:
                budgets = planner.budgets(planner.SLO(ttft, tpot), latency, original[key])
                ratio_lp, level_lp = tlm.decide(it.question, budgets.ttft, budgets.tpot)
                preference = planner.Preference.from_heads(tlm.ratios, ratio_lp, tlm.levels, level_lp)
                request = planner.PlanRequest(
                    original[key], query_tokens, budgets, tlm.ratios, tlm.levels, cost, preference
                )
                for s in EVALUATED:
                    p = planner.choose(s, request, latency)
                    correct = outcome[key][(p.ratio, p.level)]
                    plans.append(
                        {
                            "task": t,
                            "id": it.id,
                            "ttft": ttft,
                            "tpot": tpot,
                            "strategy": s,
                            "ratio": p.ratio,
                            "level": p.level,
                            "feasible": int(p.feasible),
                            "correct": correct,
                            "ttft_ms": round(p.ttft_ms, 1),
                            "tpot_ms": round(p.tpot_ms, 2),
                            "chosen_by": p.chosen_by,
                        }
                    )
    engine.close()
    _write(out / "slo-plans.csv", plans)
    return summarize(plans, out)


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summarize(plans: list[dict], out: Path) -> list[dict]:
    """Rows per (SLO, strategy, task) plus the unweighted mean over tasks ("mean"); written as slo.csv/md/png."""
    groups: dict[tuple, list[dict]] = {}
    for p in plans:
        groups.setdefault((p["ttft"], p["tpot"], p["strategy"], p["task"]), []).append(p)
    summary = [_row(*key, ps) for key, ps in groups.items()]
    for ttft, tpot, s in sorted({k[:3] for k in groups}):
        per_task = [r for r in summary if (r["ttft"], r["tpot"], r["strategy"]) == (ttft, tpot, s)]
        summary.append(
            {
                "ttft": ttft,
                "tpot": tpot,
                "strategy": s,
                "task": "mean",
                "n": sum(r["n"] for r in per_task),
                **{
                    k: round(float(np.mean([r[k] for r in per_task])), 4)
                    for k in ("accuracy", "slo_met", "accuracy_within_slo")
                },
            }
        )
    _write(Path(out) / "slo.csv", summary)
    (Path(out) / "slo.md").write_text(markdown(summary))
    _plot(summary, Path(out) / "slo.png")
    return summary


def _row(ttft, tpot, s, t, ps) -> dict:
    n = len(ps)
    return {
        "ttft": ttft,
        "tpot": tpot,
        "strategy": s,
        "task": t,
        "n": n,
        "accuracy": round(sum(p["correct"] for p in ps) / n, 4),
        "slo_met": round(sum(p["feasible"] for p in ps) / n, 4),
        "accuracy_within_slo": round(sum(p["correct"] * p["feasible"] for p in ps) / n, 4),
    }


def markdown(summary: list[dict]) -> str:
    slos = sorted({(r["ttft"], r["tpot"]) for r in summary}, reverse=True)
    names = sorted({r["task"] for r in summary} - {"mean"}) + ["mean"]
    lines = [
        "Accuracy within SLO (%): correct and predicted to meet the SLO; in brackets accuracy ignoring the SLO "
        "and the share of questions whose plan meets it.",
        "",
    ]
    lines.append("| SLO <TTFT, TPOT> | strategy | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 2) + "|")
    cell = {(r["ttft"], r["tpot"], r["strategy"], r["task"]): r for r in summary}
    for ttft, tpot in slos:
        for s in EVALUATED:
            vals = []
            for t in names:
                r = cell.get((ttft, tpot, s, t))
                vals.append(
                    ""
                    if r is None
                    else f"{100 * r['accuracy_within_slo']:.1f}"
                    if t != "mean"
                    else f"**{100 * r['accuracy_within_slo']:.1f}** ({100 * r['accuracy']:.1f}, met {100 * r['slo_met']:.0f}%)"
                )
            lines.append(f"| <{ttft:g}, {tpot:g}> | {STRATEGIES[s].description} | " + " | ".join(vals) + " |")
    means = {
        s: np.mean([r["accuracy_within_slo"] for r in summary if r["strategy"] == s and r["task"] == "mean"])
        for s in EVALUATED
    }
    lines += [
        "",
        "Average over the SLOs (accuracy within SLO): "
        + ", ".join(f"{STRATEGIES[s].description} {100 * v:.1f}" for s, v in means.items()),
        "",
        "ElastiLM minus each baseline (points): "
        + ", ".join(
            f"{STRATEGIES[s].description} {100 * (means['elastilm'] - v):+.1f}"
            for s, v in means.items()
            if s != "elastilm"
        ),
        "",
    ]
    return "\n".join(lines)


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slos = sorted({(r["ttft"], r["tpot"]) for r in summary}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(EVALUATED)
    for k, s in enumerate(EVALUATED):
        rows = {(r["ttft"], r["tpot"]): r for r in summary if r["strategy"] == s and r["task"] == "mean"}
        x = np.arange(len(slos)) + (k - (len(EVALUATED) - 1) / 2) * width
        axes[0].bar(x, [100 * rows[q]["accuracy_within_slo"] for q in slos], width, label=STRATEGIES[s].description)
        axes[1].bar(x, [100 * rows[q]["slo_met"] for q in slos], width, label=STRATEGIES[s].description)
    for ax, title in zip(axes, ("accuracy within SLO (%), mean over tasks", "SLO met (%), predicted")):
        ax.set_xticks(np.arange(len(slos)), [f"<{a:g},{b:g}>" for a, b in slos])
        ax.set(title=title, xlabel="SLO <TTFT, TPOT> as fractions of the full model")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
