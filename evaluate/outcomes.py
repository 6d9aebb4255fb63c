"""The outcome grid of the trace apps: each report question answered by the compiled LLM at the plans a strategy
can pick, through the service's own code (Orchestrator.parts, compress, Orchestrator.score_options), so that a
simulated request (evaluate/simulate.py) gets the very answer the service would give it.

A plan is (prompt ratio, level, layers dropped): each of the TLM's ratios at each level, and at ratio 1.0 and
level 1.0 each layer-drop variant of the latency profile. outcomes.csv rows: app, id, ratio, level, dropped,
tokens (the prompt after compression), original (before), choice (the best option), correct, score_ms (the time
the options took to score: the service spends it after a request's generated tokens), build (grid.answered_by:
the build and the compressor that answered). A rerun skips what they have answered, so runs resume; a torn last
row is dropped (formats/files.resumable_rows).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from elastilm.evaluate import grid, trace
from elastilm.formats.files import resumable_rows
from elastilm.runtime_py import planner
from elastilm.runtime_py.serve.protocol import CompletionRequest

FIELDS = (
    "app",
    "id",
    "ratio",
    "level",
    "dropped",
    "variant",
    "tokens",
    "original",
    "choice",
    "correct",
    "score_ms",
    "build",
)
Key = tuple  # (app, question id, ratio, level, layers dropped, variant: planner.Strategy.variant)


def plans(orch) -> list[tuple[float, float, int]]:
    """Every (ratio, level, dropped) the strategies of runtime_py.planner can choose on this build."""
    drops = orch.latency.layer_drop
    dropped = sorted(set(drops.dropped.values()) - {0}) if drops else []
    return [(r, lv, 0) for r in orch.tlm.ratios for lv in orch.tlm.levels] + [(1.0, 1.0, k) for k in dropped]


def key(row: dict) -> Key:
    return (row["app"], row["id"], float(row["ratio"]), float(row["level"]), int(row["dropped"]), row["variant"])


def read(path: Path, build: str) -> dict[Key, dict]:
    """The rows `build` answered, by key."""
    out = {}
    for r in resumable_rows(path, FIELDS):
        if r["build"] == build:
            r = {**r, "choice": int(r["choice"]), "correct": int(r["correct"]), "score_ms": float(r["score_ms"])}
            out[key(r)] = r
    return out


def request_of(r: trace.Request, variant: str = "", body=trace.request_body):
    """The orchestrator's Request for trace request `r` by a strategy that runs plans as `variant` says, built
    as the service builds it from the HTTP body."""
    b = body(r, next(s.name for s in planner.STRATEGIES.values() if s.variant == variant))
    return CompletionRequest(**b).to_request(b["max_tokens"])


def fill(
    orch, requests: list[trace.Request], out: Path, keys=None, body=trace.request_body, progress: bool = True
) -> dict[Key, dict]:
    """Answer each question of `requests` at every plan as built (or only at the keys of `keys`, ablations
    included) that `out` (outcomes.csv) does not hold yet for this build; returns every row of this build."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = grid.answered_by(orch.engine.folder)
    have = read(out, build)
    questions = {(r.app.name, r.item.id): r for r in requests}
    wanted = keys if keys is not None else [(*q, *p, "") for p in plans(orch) for q in questions]
    work: dict[tuple, list[tuple[float, int]]] = {}  # (app, id, ratio, variant) -> [(level, dropped)] missing
    for app, qid, ratio, level, dropped, variant in sorted(set(wanted) - set(have)):
        work.setdefault((app, qid, ratio, variant), []).append((level, dropped))
    bar = tqdm(total=sum(map(len, work.values())), desc="outcomes", unit="run", disable=not progress)
    new_file = not out.is_file()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new_file:
            writer.writeheader()
        for (app, qid, ratio, variant), todo in work.items():
            r = questions[(app, qid)]
            request = request_of(r, variant, body)
            parts = orch.parts(request.query, request.context, request.chat)
            c = orch.compress(parts, ratio, request.strategy, request.query)
            for level, dropped in todo:
                plan = planner.Plan(ratio, level, c.achieved, 0.0, 0.0, 0.0, True, "grid", dropped)
                start = time.perf_counter()
                scores = orch.score_options(request, parts, c, plan)
                row = {
                    "app": app,
                    "id": qid,
                    "ratio": ratio,
                    "level": level,
                    "dropped": dropped,
                    "variant": variant,
                    "tokens": c.achieved,
                    "original": c.original,
                    "choice": int(np.argmax(scores)),
                    "correct": int(int(np.argmax(scores)) == r.item.answer),
                    "score_ms": round(1000 * (time.perf_counter() - start), 1),
                    "build": build,
                }
                writer.writerow(row)
                f.flush()
                have[key(row)] = row
                bar.update(1)
    bar.close()
    return have
