"""`elastilm bench trace --simulate` and `--validate`: the trace replay of evaluate/trace.py without the service.

A simulated request is planned by the service's own code (Orchestrator.parts and Orchestrator.plan: the same
TLM decisions, planner and latency calibration), takes its answer from the outcome grid (evaluate/outcomes.py:
the service's scoring code at that plan) and its latency from the profile's prediction times a pair of
measured / predicted ratios (TTFT, TPOT) drawn from the requests of a real replay: the service's run-to-run
scatter on this machine. The calibration sees these simulated measurements in the order the service would
answer: one worker taking requests from the service's fair queue (runtime_py/serve/queue.py) as they arrive,
first the warm-up requests, then per alpha each strategy's trace, as `bench trace` sends them.

Queueing: in the service and here alike TTFT runs from the moment the worker starts a request, so queueing does
not count toward TTFT or the SLO; it counts toward end-to-end latency, for which the simulated worker is busy
TTFT + (tokens - 1) x TPOT + the options' scoring time the grid measured (HTTP is not modelled).

`validate` simulates the traces of a replay folder and compares request by request (trace-agreement.md).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from elastilm.evaluate import outcomes, trace
from elastilm.evaluate.grid import answered_by
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import planner
from elastilm.runtime_py.serve.protocol import CompletionRequest
from elastilm.runtime_py.serve.queue import FairQueue


@dataclass(frozen=True)
class Scatter:
    """Measured / predicted (TTFT, TPOT) pairs of answered requests, the predictions without the calibration's
    scale (what planner.Calibration.add compares), grouped by app, the model that ran, whether the prompt was
    compressed and whether the TLM decided: the profile's error differs per level and layer-drop variant (a
    smoothed, noisy column) and with the prompt (each app's prompts have their own lengths), and the TLM's time
    scatters around the cost measured once. A plan draws from the requests of its app that ran its model the same
    way, falling back to any app, then to its model run any way, then to all (`minimum` pairs a group needs)."""

    pairs: dict  # () -> all pairs; (level, dropped), (level, dropped, compressed, decided), (app, ...): (n, 2)
    minimum: int = 8  # pairs a group needs to be drawn from
    exact: dict | None = None  # request (see _match) -> (its plan, its pair): `replayed`

    @classmethod
    def from_replay(cls, rows: list[dict]) -> Scatter:
        ok = _timed(rows)
        if not ok:
            raise ElastiLMError(
                "the replay holds no answered request with its predictions and plan scale (trace-requests.csv "
                "from an older `bench trace`): replay a trace first"
            )
        groups: dict[tuple, list] = {}
        for r in ok:
            pair = _ratios(r)
            model = (r["level"], r["layers_dropped"])
            how = (r["ratio"] < 1, planner.STRATEGIES[r["strategy"]].decides)
            for k in ((), model, (*model, *how), (r["app"], *model, *how)):
                groups.setdefault(k, []).append(pair)
        return cls({k: np.array(v) for k, v in groups.items()})

    @classmethod
    def replayed(cls, rows: list[dict]) -> Scatter:
        """A diagnostic: each replayed request, planned as in the replay, takes the very latency it had there (a
        plan the replay did not run draws as in `from_replay`), so plans can differ only by the planning code."""
        exact = {_match(r): (_plan_of(r), _ratios(r)) for r in _timed(rows)}
        return replace(cls.from_replay(rows), exact=exact)

    @classmethod
    def constant(cls, ttft: float, tpot: float) -> Scatter:
        return cls({(): np.array([[ttft, tpot]])})

    def draw(self, rng: np.random.Generator, plan: planner.Plan, request: tuple | None = None) -> tuple[float, float]:
        """A pair for `plan` of `request` (alpha, strategy, arrival, app, question id)."""
        if self.exact and request in self.exact and self.exact[request][0] == (plan.ratio, plan.level, plan.dropped):
            return self.exact[request][1]
        model = (plan.level, plan.dropped)
        app, strategy = (request[3], request[1]) if request else (None, "full")
        how = (plan.ratio < 1, planner.STRATEGIES[strategy].decides)
        for k in ((app, *model, *how), (*model, *how), model):
            if len(self.pairs.get(k, ())) >= self.minimum:
                break
        else:
            k = ()
        pairs = self.pairs[k]
        return tuple(float(x) for x in pairs[int(rng.integers(len(pairs)))])


def _timed(rows: list[dict]) -> list[dict]:
    """The answered rows that carry their predictions and plan scale (a current `bench trace`'s)."""
    return [r for r in rows if r["ok"] and isinstance(r.get("scale_ttft"), float)]


def _ratios(r: dict) -> tuple[float, float]:
    """A replayed request's measured / predicted TTFT and TPOT, the prediction without the plan scale."""
    return (
        r["ttft_ms"] * r["scale_ttft"] / r["predicted_ttft_ms"],
        r["tpot_ms"] * r["scale_tpot"] / r["predicted_tpot_ms"],
    )


@dataclass(frozen=True)
class Setup:
    """What defines a replayed trace (its trace.json): requests per trace, arrival rate, seed, questions per app,
    warm-up requests."""

    requests: int
    rate: float
    seed: int
    questions: int | None
    warmup: int

    def traces(self, alphas) -> dict[float, list[trace.Request]]:
        return {a: trace.make_trace(self.requests, a, self.rate, self.seed, self.questions) for a in alphas}

    def warm(self) -> list[trace.Request]:
        """The warm-up requests trace.warm_up sends a fresh service."""
        return trace.make_trace(self.warmup, 0.0, 1.0, self.seed + 1) if self.warmup else []


@dataclass
class _Job:
    app: str
    request: trace.Request


def _plan(orch, r: trace.Request, strategy: str, scatter: Scatter, rng, body, alpha=None) -> dict:
    """Plan one request as the service does, draw its latency, feed the calibration; the row without outcome."""
    b = body(r, strategy)
    request = CompletionRequest(**b).to_request(b["max_tokens"])
    parts = orch.parts(request.query, request.context, request.chat)
    scale = orch.calibration.plan_scale
    plan, budgets = orch.plan(request, parts)
    a, c = scatter.draw(rng, plan, (alpha, strategy, round(r.at, 3), r.app.name, r.item.id))
    predicted = (plan.ttft_ms / scale[0], plan.tpot_ms / scale[1])  # the profile's own, as Calibration sees them
    ttft, tpot = predicted[0] * a, predicted[1] * c
    if orch.calibrate:
        orch.calibration.add(0, ttft, predicted[0])
        if request.max_new_tokens > 1:
            orch.calibration.add(1, tpot, predicted[1])
    ttft_met = ttft <= budgets.ttft_ms
    tpot_met = request.max_new_tokens < 2 or tpot <= budgets.tpot_ms
    return {
        "app": r.app.name,
        "task": r.app.task,
        "id": r.item.id,
        "strategy": strategy,
        "arrival_s": round(r.at, 3),
        "ok": 1,
        "slo_met": int(ttft_met and tpot_met),
        "ttft_met": int(ttft_met),
        "tpot_met": int(tpot_met),
        "level": plan.level,
        "layers_dropped": plan.dropped,
        "ratio": plan.ratio,
        "ttft_ms": round(ttft, 1),
        "tpot_ms": round(tpot, 1),
        "predicted_ttft_ms": round(plan.ttft_ms, 3),
        "predicted_tpot_ms": round(plan.tpot_ms, 3),
        "scale_ttft": scale[0],
        "scale_tpot": scale[1],
        "budget_ttft_ms": round(budgets.ttft_ms, 1),
        "budget_tpot_ms": round(budgets.tpot_ms, 1),
        "tokens": request.max_new_tokens,
        "answer": r.item.answer,
    }


def _serve(orch, alpha, requests, strategy, scatter, rng, grid, body, default_score_ms) -> tuple[list[dict], set]:
    """One strategy's trace through a simulated worker: requests leave the fair queue one at a time, each once
    the previous one is done; returns the rows and the grid keys that were missing."""
    queue = FairQueue(len(requests) + 1, 1.0)
    arriving = deque(sorted(requests, key=lambda r: r.at))
    free, rows, missing = 0.0, [], set()
    while arriving or len(queue):
        if not len(queue):
            free = max(free, arriving[0].at)
        while arriving and arriving[0].at <= free:
            r = arriving.popleft()
            queue.put(_Job(r.app.name, r))
        r = queue.get().request
        row = _plan(orch, r, strategy, scatter, rng, body, alpha)
        variant = planner.STRATEGIES[strategy].variant
        k = (row["app"], row["id"], row["ratio"], row["level"], row["layers_dropped"], variant)
        outcome = grid.get(k)
        if outcome is None:
            missing.add(k)
        row["correct"] = outcome["correct"] if outcome else 0
        row["choice"] = outcome["choice"] if outcome else -1
        score_ms = outcome["score_ms"] if outcome else default_score_ms
        busy = row["ttft_ms"] + (row["tokens"] - 1) * row["tpot_ms"] + score_ms
        free = max(free, r.at) + busy / 1000
        row["e2e_ms"] = round(1000 * (free - r.at), 1)
        rows.append(row)
    return rows, missing


def simulate(
    orch,
    traces: dict[float, list[trace.Request]],
    runs: list[tuple[float, str]],
    scatter: Scatter,
    draw_seed: int,
    grid_path: Path,
    body=None,
    warm: list[trace.Request] = (),
    progress: bool = True,
) -> list[dict]:
    """The rows of `runs` ((alpha, strategy) in the order a replay sends them, over `traces` by alpha) through one
    fresh simulated service that first answers `warm`; outcomes the grid lacks are computed
    (evaluate/outcomes.fill) and the simulation run again. `body`: trace.request_body unless given."""
    from tqdm import tqdm

    body = body or trace.request_body
    grid = outcomes.read(grid_path, answered_by(orch.engine.folder))
    while True:
        orch.calibration = planner.Calibration()
        rng = np.random.default_rng(draw_seed)
        typical = statistics.median([g["score_ms"] for g in grid.values()]) if grid else 0.0
        for r in warm:  # not recorded, as in trace.warm_up
            _plan(orch, r, "full", scatter, rng, body)
        rows, missing = [], set()
        for alpha, s in tqdm(runs, desc="simulate", unit="trace", disable=not progress):
            got, lacking = _serve(orch, alpha, traces[alpha], s, scatter, rng, grid, body, typical)
            rows += [{"alpha": alpha, **r} for r in got]
            missing |= lacking
        if not missing:
            return rows
        requests = [r for t in traces.values() for r in t]
        grid = outcomes.fill(orch, requests, grid_path, keys=missing, body=body, progress=progress)


def setup_of(folder: Path) -> Setup:
    path = Path(folder) / "trace.json"
    if not path.is_file():
        raise ElastiLMError(f"{path}: missing; `elastilm bench trace --out {folder}` writes it with the replay")
    return Setup(**json.loads(path.read_text()))


def service_cost(folder: Path) -> planner.TLMCost:
    """The TLM cost the replayed service measured (its service.json), which a simulation plans with."""
    path = Path(folder) / "service.json"
    if not path.is_file():
        raise ElastiLMError(f"{path}: missing; a finished `elastilm bench trace --out {folder}` writes it")
    return planner.TLMCost(**json.loads(path.read_text())["tlm_cost_ms"])


def validate(orch, folder: Path, grid_path: Path, body=None, draws: int = 10, progress: bool = True) -> list[dict]:
    """Simulate the traces replayed in `folder` `draws` times (latency draws seeded 0 .., the figures are their
    means) and once with the replay's own latencies (Scatter.replayed), and compare request by request and per
    strategy; writes trace-simulated.csv (the first draw) and trace-agreement.md there; returns the table."""
    folder = Path(folder)
    replayed = trace.read_rows(folder / "trace-requests.csv")
    if not replayed:
        raise ElastiLMError(f"{folder}/trace-requests.csv: no replayed requests")
    setup = setup_of(folder)
    orch.cost = service_cost(folder)
    runs = list(dict.fromkeys((r["alpha"], r["strategy"]) for r in replayed))
    traces = setup.traces(sorted({a for a, _ in runs}))
    scatter = Scatter.from_replay(replayed)
    sims = [
        simulate(orch, traces, runs, scatter, d, grid_path, body, setup.warm(), progress and d == 0)
        for d in range(draws)
    ]
    exact = simulate(orch, traces, runs, Scatter.replayed(replayed), 0, grid_path, body, setup.warm(), False)
    _write(folder / "trace-simulated.csv", sims[0])
    table = agreement(replayed, sims, exact)
    (folder / "trace-agreement.md").write_text(agreement_markdown(table, draws))
    return table


def _match(r: dict) -> tuple:
    return (r["alpha"], r["strategy"], round(float(r["arrival_s"]), 3), r["app"], r["id"])


def _plan_of(r: dict) -> tuple:
    return (r["ratio"], r["level"], r["layers_dropped"])


def agreement(replayed: list[dict], sims: list[list[dict]], exact: list[dict]) -> list[dict]:
    """Per strategy (and over all), in percent of the replayed requests: the same plan and the same correctness in
    the simulations (their mean) and with the replay's latencies; SLO attainment and accuracy within SLO replayed
    (with a 95% binomial half-width) and simulated (the mean over the draws)."""
    ok = [r for r in replayed if r["ok"]]
    by_sim = [{_match(r): r for r in rows} for rows in sims]
    by_exact = {_match(r): r for r in exact}
    out = []
    for s in list(dict.fromkeys(r["strategy"] for r in ok)) + ["all"]:
        sel = [r for r in ok if s in ("all", r["strategy"])]
        n = len(sel)

        def share(test, sim, sel=sel) -> float:
            return 100 * sum(test(r, sim[_match(r)]) for r in sel) / len(sel)

        def mean(test, share=share) -> float:
            return round(float(np.mean([share(test, sim) for sim in by_sim])), 1)

        within = 100 * sum(r["correct"] * r["slo_met"] for r in sel) / n
        out.append(
            {
                "strategy": s,
                "n": n,
                "same_plan": mean(lambda a, b: _plan_of(a) == _plan_of(b)),
                "same_plan_exact": round(share(lambda a, b: _plan_of(a) == _plan_of(b), by_exact), 1),
                "same_correct": mean(lambda a, b: a["correct"] == b["correct"]),
                "slo_met_replay": round(100 * sum(r["slo_met"] for r in sel) / n, 1),
                "slo_met_sim": mean(lambda a, b: b["slo_met"]),
                "within_slo_replay": round(within, 1),
                "within_slo_halfwidth": round(1.96 * (within * (100 - within) / n) ** 0.5, 1),
                "within_slo_sim": mean(lambda a, b: b["correct"] * b["slo_met"]),
            }
        )
    return out


def agreement_markdown(table: list[dict], draws: int) -> str:
    lines = [
        f"Simulated ({draws} latency draws, means) vs replayed, request by request: percent of the replayed "
        "requests. 'replay latencies': one simulation in which each request the simulation plans as the replay "
        "did takes the latency it had there.",
        "",
        "| strategy | requests | same plan | same plan, replay latencies | same correctness | SLO met: replay / sim "
        "| within SLO: replay (95%) / sim |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['strategy']} | {r['n']} | {r['same_plan']} | {r['same_plan_exact']} | {r['same_correct']} | "
            f"{r['slo_met_replay']} / {r['slo_met_sim']} | {r['within_slo_replay']} (+-{r['within_slo_halfwidth']})"
            f" / {r['within_slo_sim']} |"
        )
    return "\n".join(lines) + "\n"


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(
    build: Path,
    scatter_from: Path,
    alphas: list[float],
    strategies: list[str],
    requests: int,
    rate: float,
    seeds: list[int],
    questions: int,
    warmup: int,
    grid_path: Path,
    out: Path,
    progress: bool = True,
) -> list[dict]:
    """One simulated service per seed (its own trace and latency draws), every alpha and strategy; writes
    trace-requests.csv (with a seed column), the report of evaluate/trace_report.py over all seeds, and
    trace-gaps.md/png: ElastiLM's paired difference to each other strategy with its 95% interval."""
    from elastilm.evaluate.trace_report import summarize
    from elastilm.runtime_py.orchestrator import Orchestrator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    replayed = trace.read_rows(Path(scatter_from) / "trace-requests.csv")
    scatter = Scatter.from_replay(replayed)
    orch = Orchestrator(build)
    orch.cost = service_cost(scatter_from)
    runs = [(a, s) for a in alphas for s in strategies]
    rows = []
    try:
        for seed in seeds:
            setup = Setup(requests, rate, seed, questions, warmup)
            got = simulate(
                orch, setup.traces(alphas), runs, scatter, seed, grid_path, warm=setup.warm(), progress=progress
            )
            rows += [{"seed": seed, **r} for r in got]
    finally:
        orch.close()
    _write(out / "trace-requests.csv", rows)
    gaps = paired_gaps(rows)
    (out / "trace-gaps.md").write_text(gaps_markdown(gaps))
    _plot_gaps(gaps, out / "trace-gaps.png")
    return summarize(rows, out, [a.name for a in trace.APPS])


def paired_gaps(rows: list[dict], reference: str = "elastilm") -> list[dict]:
    """Per alpha (and over all alphas) and strategy: the mean of `reference`'s correct-within-SLO minus the
    strategy's over the same requests (same seed, trace position), in points, with a 95% normal interval."""
    within = {}
    for r in rows:
        within[(r.get("seed", 0), r["alpha"], r["strategy"], r["arrival_s"], r["app"], r["id"])] = (
            r["correct"] * r["slo_met"]
        )
    out = []
    others = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != reference]
    for alpha in sorted({r["alpha"] for r in rows}) + [None]:
        for s in others:
            d = [
                v - within[k[:2] + (s,) + k[3:]]
                for k, v in within.items()
                if k[2] == reference and (alpha is None or k[1] == alpha) and k[:2] + (s,) + k[3:] in within
            ]
            if len(d) < 2:
                continue
            mean, half = float(np.mean(d)), 1.96 * float(np.std(d, ddof=1)) / len(d) ** 0.5
            out.append(
                {
                    "alpha": "all" if alpha is None else alpha,
                    "strategy": s,
                    "n": len(d),
                    "gap": round(100 * mean, 2),
                    "low": round(100 * (mean - half), 2),
                    "high": round(100 * (mean + half), 2),
                }
            )
    return out


def gaps_markdown(gaps: list[dict]) -> str:
    lines = [
        "ElastiLM minus each strategy, accuracy within SLO (points), paired by request, with 95% intervals.",
        "",
        "| alpha | strategy | requests | gap | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for g in gaps:
        alpha = g["alpha"] if g["alpha"] == "all" else f"{g['alpha']:+g}"
        lines.append(
            f"| {alpha} | {g['strategy']} | {g['n']} | {g['gap']:+.1f} | [{g['low']:+.1f}, {g['high']:+.1f}] |"
        )
    return "\n".join(lines) + "\n"


def _plot_gaps(gaps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = list(dict.fromkeys(g["alpha"] for g in gaps))
    strategies = list(dict.fromkeys(g["strategy"] for g in gaps))
    fig, ax = plt.subplots(figsize=(9, 4.4))
    width = 0.8 / max(1, len(strategies))
    cell = {(g["alpha"], g["strategy"]): g for g in gaps}
    for k, s in enumerate(strategies):
        x = np.arange(len(alphas)) + (k - (len(strategies) - 1) / 2) * width
        got = [cell.get((a, s)) for a in alphas]
        y = [g["gap"] if g else 0 for g in got]
        err = [[g["gap"] - g["low"] if g else 0 for g in got], [g["high"] - g["gap"] if g else 0 for g in got]]
        ax.bar(x, y, width, yerr=err, capsize=2, label=s)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(alphas)), [a if a == "all" else f"alpha {a:+g}" for a in alphas])
    ax.set(title="ElastiLM minus each strategy: accuracy within SLO (points, 95% interval)")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
