"""The trace replay's report: per (alpha, strategy, app) accuracy, SLO attainment and latencies from the rows of
trace-requests.csv (evaluate/trace.py), written as trace.csv, trace.md and trace.png, and a summary line per
strategy with ElastiLM's gap to each baseline."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import numpy as np

from elastilm.runtime_py.planner import STRATEGIES


def stats(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["ok"]]
    n = len(ok)
    if not n:
        return {"n": 0, "errors": len(rows)}
    ttft = sorted(r["ttft_ms"] for r in ok)
    e2e = sorted(r["e2e_ms"] for r in ok)
    p99 = lambda xs: xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]  # noqa: E731
    return {
        "n": n,
        "errors": len(rows) - n,
        "accuracy": round(sum(r["correct"] for r in ok) / n, 4),
        "slo_met": round(sum(r["slo_met"] for r in ok) / n, 4),
        "ttft_met": round(sum(r["ttft_met"] for r in ok) / n, 4),
        "tpot_met": round(sum(r["tpot_met"] for r in ok) / n, 4),
        "accuracy_within_slo": round(sum(r["correct"] * r["slo_met"] for r in ok) / n, 4),
        "ttft_ms_mean": round(statistics.fmean(ttft), 1),
        "ttft_ms_p50": round(statistics.median(ttft), 1),
        "ttft_ms_p99": round(p99(ttft), 1),
        "tpot_ms_mean": round(statistics.fmean(r["tpot_ms"] for r in ok), 2),
        "e2e_ms_mean": round(statistics.fmean(e2e), 1),
        "e2e_ms_p50": round(statistics.median(e2e), 1),
        "e2e_ms_p99": round(p99(e2e), 1),
    }


def summarize(rows: list[dict], out: Path, apps: list[str]) -> list[dict]:
    """Per (alpha, strategy, app) and per (alpha, strategy) over all apps (`apps`: the order of the columns);
    written as trace.csv/md/png."""
    out = Path(out)
    table = []
    for alpha in sorted({r["alpha"] for r in rows}):
        for s in [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]:
            sel = [r for r in rows if r["alpha"] == alpha and r["strategy"] == s]
            for app in list(apps) + ["all"]:
                part = sel if app == "all" else [r for r in sel if r["app"] == app]
                if part:
                    table.append({"alpha": alpha, "strategy": s, "app": app, **stats(part)})
    with (out / "trace.csv").open("w", newline="") as f:
        fields = sorted({k for r in table for k in r}, key=lambda k: list(table[0]).index(k) if k in table[0] else 99)
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(table)
    (out / "trace.md").write_text(markdown(table, apps))
    _plot(table, out / "trace.png")
    return table


def summary_lines(table: list[dict]) -> list[str]:
    """One line per (alpha, strategy) over all apps, then ElastiLM's gap to each baseline averaged over alphas."""
    lines = []
    overall = [r for r in table if r["app"] == "all"]
    for r in overall:
        if not r["n"]:
            lines.append(
                f"alpha {r['alpha']:+g} {STRATEGIES[r['strategy']].description}: all {r['errors']} requests failed"
            )
            continue
        lines.append(
            f"alpha {r['alpha']:+g} {STRATEGIES[r['strategy']].description}: accuracy {100 * r['accuracy']:.1f}%, SLO met "
            f"{100 * r['slo_met']:.1f}%, accuracy within SLO {100 * r['accuracy_within_slo']:.1f}%, TTFT p50/p99 "
            f"{r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f} ms, end-to-end p50/p99 {r['e2e_ms_p50']:.0f}/{r['e2e_ms_p99']:.0f} ms"
        )
    answered = [r for r in overall if r["n"]]
    mean = {
        s: statistics.fmean(r["accuracy_within_slo"] for r in answered if r["strategy"] == s)
        for s in {r["strategy"] for r in answered}
    }
    if "elastilm" in mean and len(mean) > 1:
        lines.append(
            "ElastiLM minus each baseline, accuracy within SLO averaged over the alphas (points): "
            + ", ".join(
                f"{STRATEGIES[s].description} {100 * (mean['elastilm'] - v):+.1f}"
                for s, v in sorted(mean.items())
                if s != "elastilm"
            )
        )
    return lines


def markdown(table: list[dict], apps: list[str]) -> str:
    lines = [
        "Accuracy within SLO (%) per app: correct and the measured TTFT and TPOT within the budget; the last "
        "columns over all requests.",
        "",
    ]
    lines.append(
        "| alpha | strategy | "
        + " | ".join(apps)
        + " | all: accuracy | all: SLO met | all: within SLO | TTFT p50/p99 ms | end-to-end p50/p99 ms |"
    )
    lines.append("|---" * (len(apps) + 7) + "|")
    cell = {(r["alpha"], r["strategy"], r["app"]): r for r in table}
    for alpha in sorted({r["alpha"] for r in table}):
        for s in STRATEGIES:
            a = cell.get((alpha, s, "all"))
            if a is None:
                continue
            per = [
                f"{100 * cell[(alpha, s, x)].get('accuracy_within_slo', 0):.0f} (n={cell[(alpha, s, x)]['n']})"
                if (alpha, s, x) in cell
                else ""
                for x in apps
            ]
            if not a["n"]:
                lines.append(
                    f"| {alpha:+g} | {STRATEGIES[s].description} | " + " | ".join(per) + f" | all {a['errors']} "
                    "requests failed | | | | |"
                )
                continue
            lines.append(
                f"| {alpha:+g} | {STRATEGIES[s].description} | "
                + " | ".join(per)
                + f" | {100 * a['accuracy']:.1f} | {100 * a['slo_met']:.1f} | "
                f"**{100 * a['accuracy_within_slo']:.1f}** | {a['ttft_ms_p50']:.0f}/{a['ttft_ms_p99']:.0f} | "
                f"{a['e2e_ms_p50']:.0f}/{a['e2e_ms_p99']:.0f} |"
            )
    return "\n".join(lines + ["", *summary_lines(table), ""])


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in table})
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in table)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / len(strategies)
    for k, s in enumerate(strategies):
        rows = {r["alpha"]: r for r in table if r["strategy"] == s and r["app"] == "all"}
        x = np.arange(len(alphas) + 1) + (k - (len(strategies) - 1) / 2) * width
        for ax, key in zip(axes, ("accuracy_within_slo", "slo_met")):
            values = [100 * rows[a].get(key, 0) if a in rows else 0 for a in alphas]  # no key: every request failed
            ax.bar(x, values + [float(np.mean(values))], width, label=STRATEGIES[s].description)
    for ax, title in zip(axes, ("accuracy within SLO (%)", "SLO met (%)")):
        ax.set_xticks(np.arange(len(alphas) + 1), [f"alpha {a:+g}" for a in alphas] + ["mean"])
        ax.set(title=title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
