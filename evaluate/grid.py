"""Run the elastic LLM at every (prompt ratio, level) on benchmark questions: is each answer still correct?

This one table feeds both the TLM's decision labels (on the tune parts: "self-induced" labels) and the SLO
evaluation of every strategy (on the report parts): a strategy only picks a (ratio, level) per question, so its
accuracy is a lookup. Each question's prompt is its task's 5-shot prefix (compressible) and the question (kept
whole), compressed by the TLM's score head to the ratio of the whole prompt (runtime.compress), then scored as in
the harness (per-character option log-likelihood, calibrated for DroidTask) with the level's recovery adapter.

grid.csv rows: task, part, id, ratio, level, tokens (prompt after compression), original (before), correct, build
(answered_by: formats/build.build_id of the build that answered and the compressor's version). A rerun skips what
that build has already answered with this compressor, so runs resume; a torn last row is dropped
(formats/files.resumable_rows).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from elastilm.evaluate import harness, tasks
from elastilm.formats import build as build_file
from elastilm.formats.files import resumable_rows
from elastilm.runtime_py import compress as compressor
from elastilm.runtime_py.compress import Part, compress

FIELDS = ("task", "part", "id", "ratio", "level", "tokens", "original", "correct", "build")
SHOTS = 5


def questions(task: str, part: str, limit: int | None) -> list[tasks.Item]:
    """The questions of a part; on the tune part, never the few-shot examples of the prompt."""
    items = tasks.items(task, part)
    if part == "tune":
        items = items[SHOTS:]
    return items[:limit]


def answered_by(folder: Path) -> str:
    """The key of the rows a build answers: its build_id and the compressor's version, since both decide the
    prompt each row was answered from."""
    return f"{build_file.build_id(folder)}-c{compressor.VERSION}"


def read(path: Path, build: str) -> list[dict]:
    """The rows of `build` (answered_by)."""
    return [
        {
            **r,
            "ratio": float(r["ratio"]),
            "level": float(r["level"]),
            "tokens": int(r["tokens"]),
            "original": int(r["original"]),
            "correct": int(r["correct"]),
        }
        for r in resumable_rows(path, FIELDS)
        if r["build"] == build
    ]


def run_grid(
    engine, tlm, task_names: list[str], part: str, ratios, levels, limit: int | None, out: Path, progress: bool = True
) -> list[dict]:
    """Fill `out` (grid.csv) for every (task, question, ratio, level) missing; returns all rows."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = answered_by(engine.folder)
    done = {(r["task"], r["part"], r["id"], r["ratio"], r["level"]) for r in read(out, build)}
    work = [(t, it) for t in task_names for it in questions(t, part, limit)]
    bar = tqdm(total=len(work) * len(ratios) * len(levels), desc=f"grid {part}", unit="run", disable=not progress)
    new_file = not out.is_file()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new_file:
            writer.writeheader()
        for t, it in work:
            prefix = tasks.fewshot_prefix(t, SHOTS)
            question = engine.encode(it.question)
            for ratio in ratios:
                todo = [lv for lv in levels if (t, part, it.id, ratio, lv) not in done]
                bar.update(len(levels) - len(todo))
                if not todo:
                    continue
                c = compress(
                    [Part(prefix), Part(it.question, compress=False)],
                    ratio,
                    tlm,
                    engine.tokenizer,
                    question=it.question,
                )
                kept = c.ids[: len(c.ids) - len(question)]
                for lv in todo:
                    if kept:
                        engine.prefill(kept, lv)
                    scores = harness.item_scores(engine, t, len(kept), it, lv, {})
                    writer.writerow(
                        {
                            "task": t,
                            "part": part,
                            "id": it.id,
                            "ratio": ratio,
                            "level": lv,
                            "tokens": c.achieved,
                            "original": c.original,
                            "correct": int(int(np.argmax(scores)) == it.answer),
                            "build": build,
                        }
                    )
                    f.flush()
                    bar.update(1)
    bar.close()
    return read(out, build)
