"""Load test of `elastilm serve` on loopback: N requests from C concurrent clients with mixed SLOs.

    python benchmarks/load_test.py --build dist/smollm2-135m/host-cpu --requests 200 --clients 8

Starts the service in a subprocess on a free loopback port, then each client thread sends its share of requests
(chat and completions, streaming or not, SLOs drawn from the paper's pairs and from millisecond budgets, prompts
from the benchmarks' report parts). A 429 is retried after its Retry-After; anything else that is not a
well-formed answer counts as an error. Bounded by --requests and --time-limit. With --app-keys the service gets
one key per app (the six well-formed apps, and one for all hostile clients), so the queue tells them apart by key.
Writes benchmarks/results/load-test.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from elastilm.evaluate import tasks
from elastilm.evaluate.trace import start_service as spawn

APPS = [f"app{i}" for i in range(6)]
SLOS = [
    {"ttft": 0.8, "tpot": 0.9},
    {"ttft": 0.6, "tpot": 0.8},
    {"ttft": 0.4, "tpot": 0.7},
    {"ttft": 0.2, "tpot": 0.6},
    {"ttft": 0.2, "tpot": 0.5},
    {"ttft_ms": 400, "tpot_ms": 40},
    {"ttft_ms": 150, "tpot_ms": 30},
    None,
]


def request_body(rng: random.Random, n: int) -> tuple[str, dict]:
    task = rng.choice(list(tasks.TASKS))
    item = rng.choice(tasks.items(task, "report"))
    slo = rng.choice(SLOS)
    common = {"max_tokens": rng.choice([4, 8, 16]), "stream": rng.random() < 0.5, "user": APPS[n % len(APPS)]}
    if slo:
        common["slo"] = slo
    if rng.random() < 0.5:
        return "/v1/chat/completions", {
            **common,
            "messages": [
                {"role": "system", "content": tasks.fewshot_prefix(task)},
                {"role": "user", "content": item.question},
            ],
        }
    return "/v1/completions", {**common, "prompt": item.question, "context": tasks.fewshot_prefix(task)}


def well_formed(path: str, body: dict, response: httpx.Response) -> dict:
    """The answer's report, after checking the response's shape; raises AssertionError otherwise."""
    assert response.status_code == 200, f"{response.status_code}: {response.text[:200]}"
    if body["stream"]:
        lines = [ln[6:] for ln in response.text.splitlines() if ln.startswith("data: ")]
        assert lines and lines[-1] == "[DONE]", "stream did not end with [DONE]"
        events = [json.loads(x) for x in lines[:-1]]
        last = events[-1]
        assert all("choices" in e for e in events)
    else:
        last = response.json()
        assert last["choices"][0]["message" if path.endswith("chat/completions") else "text"] is not None
    ext = last["elastilm"]
    assert {"level", "prompt_ratio", "measured_ms", "predicted_ms", "slo_met"} <= set(ext), "missing elastilm report"
    return ext


HOSTILE = ("oversized", "malformed", "strings-for-numbers", "slow-reader", "disconnect-mid-stream")


def hostile_request(http: httpx.Client, kind: str, rng: random.Random) -> str:
    """One hostile request of `kind`; returns what happened (a status code, or how the client left)."""
    headers = {"content-type": "application/json"}
    if kind == "oversized":
        return str(
            http.post(
                "/v1/completions", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}', headers=headers
            ).status_code
        )
    if kind == "malformed":
        return str(
            http.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", ', headers=headers).status_code
        )
    if kind == "strings-for-numbers":
        body = {"prompt": "Hello", "max_tokens": "16", "temperature": "0.5"}
        return str(http.post("/v1/completions", json=body).status_code)
    _, body = request_body(rng, 0)
    body = {**body, "stream": True, "max_tokens": 16}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return str(r.status_code)
        for _chunk in r.iter_raw():
            if kind == "disconnect-mid-stream":
                return "left after the first chunk"
            time.sleep(1.0)  # a slow reader
        return "read slowly to the end"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--queue", type=int, default=6, help="the server's queue (smaller than --clients, so 429s happen)"
    )
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; clients stop sending after it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile", type=int, default=0, help="clients sending hostile traffic alongside")
    parser.add_argument("--app-keys", action="store_true", help="one key per app (--app-keys of the service)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    keys = {app: f"key-{app}-{random.Random(app).getrandbits(64):x}" for app in [*APPS, "hostile"]}
    key_file = None
    if args.app_keys:
        key_file = Path(tempfile.mkdtemp()) / "app-keys.json"
        key_file.write_text(json.dumps(keys))
    server, url = spawn(
        args.build, args.out / "load-test-server.log", queue=args.queue, max_tokens=16, app_keys=key_file
    )

    def auth(app: str) -> dict:
        return {"Authorization": f"Bearer {keys[app]}"} if args.app_keys else {}

    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.time() + args.time_limit
    per_client = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]

    def client(k: int) -> None:
        rng = random.Random(args.seed * 1000 + k)
        with httpx.Client(base_url=url, timeout=300) as http:
            for n in range(per_client[k]):
                if time.time() > stop_at:
                    return
                path, body = request_body(rng, k * 1000 + n)
                start, retries = time.perf_counter(), 0
                while True:
                    r = http.post(path, json=body, headers=auth(body["user"]))
                    if r.status_code != 429:
                        break
                    retries += 1
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                row = {
                    "client": k,
                    "path": path,
                    "stream": body["stream"],
                    "retries_429": retries,
                    "wall_ms": 1000 * (time.perf_counter() - start),
                }
                try:
                    ext = well_formed(path, body, r)
                    row.update(
                        ok=True,
                        slo_met=ext["slo_met"],
                        level=ext["level"],
                        ratio=ext["prompt_ratio"],
                        ttft_ms=ext["measured_ms"]["ttft"],
                        predicted_ttft_ms=ext["predicted_ms"]["ttft"],
                    )
                except (AssertionError, ValueError, KeyError) as e:
                    row.update(ok=False, error=str(e))
                with lock:
                    results.append(row)

    done = threading.Event()
    hostile: dict[str, dict[str, int]] = {k: {} for k in HOSTILE}

    def attacker(k: int) -> None:
        rng = random.Random(args.seed * 1000 + 500 + k)
        with httpx.Client(base_url=url, timeout=120, headers=auth("hostile")) as http:
            n = k
            while not done.is_set():
                kind = HOSTILE[n % len(HOSTILE)]
                try:
                    outcome = hostile_request(http, kind, rng)
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                with lock:
                    hostile[kind][outcome] = hostile[kind].get(outcome, 0) + 1
                n += 1

    # load the data sets here: datasets' loader is not safe to run from several threads at once
    for task in tasks.TASKS:
        tasks.items(task, "report")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    attackers = [threading.Thread(target=attacker, args=(k,)) for k in range(args.hostile)]
    for t in threads + attackers:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    done.set()
    for t in attackers:
        t.join()
    health_after = httpx.get(f"{url}/health", timeout=5).json()
    metrics = httpx.get(f"{url}/metrics", timeout=5, headers=auth("app0")).text
    alive = server.poll() is None
    server.terminate()
    server.wait(30)

    ok = [r for r in results if r["ok"]]
    walls = sorted(r["wall_ms"] for r in ok)
    doc = {
        "requests_planned": args.requests,
        "requests_sent": len(results),
        "answered_ok": len(ok),
        "errors": [r["error"] for r in results if not r["ok"]],
        "clients": args.clients,
        "server_queue": args.queue,
        "app_keys": args.app_keys,
        "seconds": round(seconds, 1),
        "throughput_rps": round(len(ok) / seconds, 3),
        "retries_429": sum(r["retries_429"] for r in results),
        "wall_ms_p50": round(statistics.median(walls), 1) if walls else None,
        "wall_ms_p99": round(walls[min(len(walls) - 1, int(0.99 * len(walls)))], 1) if walls else None,
        "ttft_ms_p50": round(statistics.median(r["ttft_ms"] for r in ok), 1) if ok else None,
        "slo_met": round(sum(r["slo_met"] for r in ok) / max(len(ok), 1), 3),
        "hostile_clients": args.hostile,
        "hostile_outcomes": hostile if args.hostile else None,
        "server_alive_after": alive,
        "health_after": health_after,
        "server_counted_ok": sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("elastilm_requests_total") and 'status="200"' in line
        ),
    }
    (args.out / "load-test.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"Load test: {doc['requests_sent']} requests from {args.clients} clients (server queue {args.queue}), "
        f"{doc['seconds']} s on loopback.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in doc.items() if k not in ("errors", "health_after", "hostile_outcomes")]
    if args.hostile:
        lines += ["", "Hostile requests, by what happened:", ""]
        lines += [f"- {kind}: {outcomes}" for kind, outcomes in hostile.items()]
    (args.out / "load-test.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if doc["errors"] or len(ok) != args.requests or not alive or health_after.get("status") != "ok":
        sys.exit(f"{len(doc['errors'])} malformed answers, {args.requests - len(ok)} requests not answered")


if __name__ == "__main__":
    main()
