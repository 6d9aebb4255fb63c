"""Accuracy per level through the compiled engine (the thing users run).

For each task the few-shot prefix is prefilled once per level and stays in the KV cache; each question is then
scored after it (`ElasticEngine.score`), and each option after the question, so an option costs only its own
tokens. An option's score is its log-likelihood per character (length-normalised, as lm-eval's acc_norm), minus
its score after a content-free question for the tasks in `tasks.NULL_QUESTION`; the prediction is the
best-scoring option.

Variants: "adapters" (reordered model, each level with its recovery adapter), "no-adapters" (the same build,
plain sub-models), "original-order" (a model elastified without reordering: prefixes of the original order) and
"layer-drop" (the same build's ShortGPT variant with each level's share of the parameters: layers skipped, full width).
`prompt ratio` < 1 shortens the few-shot prefix with a simple baseline compressor (keep the instruction line and
the last tokens of the examples) until the TLM exists; the question and options are never cut.

Results go to a folder: items.csv (one row per scored item; a rerun skips what is there, so runs resume),
accuracy.csv, accuracy.md and accuracy.png.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastilm.evaluate import tasks
from elastilm.formats import build as build_file
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import resumable_rows
from elastilm.runtime_py.choice import option_scores

VARIANTS = {
    "adapters": "reordered + recovery adapters",
    "no-adapters": "reordered, no adapters",
    "original-order": "not reordered, no adapters",
    "layer-drop": "layers dropped (ShortGPT), same parameter share",
}
# build: formats/build.build_id of the build that answered (rows of another build are not reused)
ITEM_FIELDS = ("task", "variant", "level", "ratio", "id", "answer", "pred", "correct", "scores", "build")


@dataclass(frozen=True)
class Run:
    variant: str
    build: Path  # compile output folder


def runs(variants: list[str], build: Path, original_build: Path | None = None) -> list[Run]:
    """The runs for `variants` of one build; "original-order" runs `original_build` (a build of `elastilm
    elastify --no-reorder`)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ElastiLMError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "original-order" in variants and original_build is None:
        raise ElastiLMError(
            "variant original-order needs --original-build (a build of `elastilm elastify --no-reorder`)"
        )
    return [Run(v, original_build if v == "original-order" else build) for v in variants]


def item_scores(engine, task: str, past: int, item: tasks.Item, level: float, null: dict) -> list[float]:
    """The option scores of `item` after `past` cached tokens, calibrated for the tasks in tasks.NULL_QUESTION
    (`null` keeps the content-free scores of each option list, computed once per level)."""
    options, chars = [engine.encode(o) for o in item.options], [len(o) for o in item.options]
    scores = option_scores(engine, past, engine.encode(item.question), options, level, chars)
    if task not in tasks.NULL_QUESTION:
        return scores
    if item.options not in null:
        null[item.options] = option_scores(
            engine, past, engine.encode(tasks.NULL_QUESTION[task]), options, level, chars
        )
    return [s - b for s, b in zip(scores, null[item.options])]


def compress_prefix(engine, task: str, ratio: float) -> list[int]:
    """Token ids of the few-shot prefix, shortened to `ratio` of its tokens by keeping the instruction line and
    the last tokens of the examples (the baseline compressor)."""
    text = tasks.fewshot_prefix(task)
    instruction, examples = text.split("\n\n", 1)
    head, body = engine.encode(instruction + "\n\n"), engine.encode(examples)
    keep = max(0, math.ceil(ratio * (len(head) + len(body))) - len(head))
    return head + body[len(body) - keep :] if keep else head


def _done(path: Path) -> set[tuple]:
    return {
        (r["task"], r["variant"], r["level"], r["ratio"], r["id"], r["build"])
        for r in resumable_rows(path, ITEM_FIELDS)
    }


def evaluate(
    runs: list[Run],
    task_names: list[str],
    levels: list[float],
    ratios: list[float],
    limit: int | None,
    out: Path,
    progress: bool = True,
) -> list[dict]:
    """Score every (run, task, level, ratio, item) not yet in out/items.csv; returns the accuracy rows."""
    from tqdm import tqdm

    from elastilm.runtime_py.engine import ElasticEngine

    for t in task_names:
        tasks.check(t, "report")
    unknown = [r.variant for r in runs if r.variant not in VARIANTS]
    if unknown:
        raise ElastiLMError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items_csv = out / "items.csv"
    done = _done(items_csv)
    builds = {run.variant: build_file.build_id(run.build) for run in runs}
    report = {t: tasks.items(t, "report")[:limit] for t in task_names}
    total = len(runs) * len(levels) * len(ratios) * sum(len(v) for v in report.values())
    bar = tqdm(total=total, desc="eval", unit="item", disable=not progress)
    new_file = not items_csv.is_file()
    with items_csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, ITEM_FIELDS)
        if new_file:
            writer.writeheader()
        for run in runs:
            engine = None
            for t in task_names:
                for level in levels:
                    for ratio in ratios:
                        key = (t, run.variant, f"{level:g}", f"{ratio:g}")
                        todo = [it for it in report[t] if (*key, it.id, builds[run.variant]) not in done]
                        bar.update(len(report[t]) - len(todo))
                        if not todo:
                            continue
                        if engine is None:
                            engine = ElasticEngine(run.build, adapters=run.variant == "adapters")
                        # the layer-dropping baseline: the variant with this level's parameter share, at full width
                        model, at = (
                            (engine.dropped(engine.drop_for_level(level)), 1.0)
                            if run.variant == "layer-drop"
                            else (engine, level)
                        )
                        prefix = compress_prefix(model, t, ratio)
                        model.prefill(prefix, at)
                        null: dict = {}
                        for it in todo:
                            scores = item_scores(model, t, len(prefix), it, at, null)
                            pred = int(np.argmax(scores))
                            writer.writerow(
                                {
                                    "task": t,
                                    "variant": run.variant,
                                    "level": f"{level:g}",
                                    "ratio": f"{ratio:g}",
                                    "id": it.id,
                                    "answer": it.answer,
                                    "pred": pred,
                                    "correct": int(pred == it.answer),
                                    "scores": json.dumps([round(s, 5) for s in scores]),
                                    "build": builds[run.variant],
                                }
                            )
                            f.flush()
                            bar.update(1)
            if engine is not None:
                engine.close()
    bar.close()
    return summarize(out, builds)


def summarize(out: Path, builds: dict[str, str] | None = None) -> list[dict]:
    """Accuracy per (task, variant, level, ratio) from items.csv, written as accuracy.csv/.md/.png; with `builds`
    ({variant: build id}), a variant's rows from that build only."""
    rows = resumable_rows(Path(out) / "items.csv", ITEM_FIELDS)
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        if builds is not None and builds.get(r["variant"], r["build"]) != r["build"]:
            continue
        groups.setdefault((r["task"], r["variant"], float(r["level"]), float(r["ratio"])), []).append(int(r["correct"]))
    acc = [
        {
            "task": t,
            "variant": v,
            "level": lv,
            "ratio": ra,
            "n": len(c),
            "accuracy": round(sum(c) / len(c), 4),
            "chance": round(tasks.chance(t), 4),
        }
        for (t, v, lv, ra), c in sorted(groups.items())
    ]
    with (Path(out) / "accuracy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(acc[0]))
        writer.writeheader()
        writer.writerows(acc)
    (Path(out) / "accuracy.md").write_text(markdown(acc))
    _plot(acc, Path(out) / "accuracy.png")
    return acc


def markdown(acc: list[dict]) -> str:
    """One table per prompt ratio: rows (task, variant), columns levels, plus the mean over levels 20%-60%."""
    lines = []
    for ratio in sorted({a["ratio"] for a in acc}, reverse=True):
        sel = [a for a in acc if a["ratio"] == ratio]
        levels = sorted({a["level"] for a in sel})
        lines += [f"Prompt ratio {ratio:g}. Accuracy (%) on the report split; n = items per cell.", ""]
        lines.append("| task | variant | n | chance | " + " | ".join(f"{lv:.0%}" for lv in levels) + " | mean 20-60% |")
        lines.append("|---" * (len(levels) + 5) + "|")
        for t, v in sorted({(a["task"], a["variant"]) for a in sel}, key=lambda k: (k[0], list(VARIANTS).index(k[1]))):
            cells = {a["level"]: a for a in sel if a["task"] == t and a["variant"] == v}
            low = [cells[lv]["accuracy"] for lv in levels if lv <= 0.6 + 1e-9 and lv in cells]
            first = next(iter(cells.values()))
            lines.append(
                f"| {t} | {VARIANTS[v]} | {first['n']} | {100 * first['chance']:.1f} | "
                + " | ".join(f"{100 * cells[lv]['accuracy']:.1f}" if lv in cells else "" for lv in levels)
                + (f" | {100 * sum(low) / len(low):.1f} |" if low else " | |")
            )
        lines.append("")
    return "\n".join(lines)


def _plot(acc: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = max(a["ratio"] for a in acc)
    sel = [a for a in acc if a["ratio"] == ratio]
    names = sorted({a["task"] for a in sel})
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, t in zip(axes[0], names):
        for v in VARIANTS:
            pts = sorted((a["level"], a["accuracy"]) for a in sel if a["task"] == t and a["variant"] == v)
            if pts:
                ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=VARIANTS[v])
        chance = next(a["chance"] for a in sel if a["task"] == t)
        ax.axhline(100 * chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set(
            title=f"{t} (n={next(a['n'] for a in sel if a['task'] == t)})",
            xlabel="level (% of elastic params)",
            ylabel="accuracy (%)",
        )
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
