"""The HTTP service on loopback, driven by a real HTTP client (httpx) against a real uvicorn server."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import tiny_build_with_tlm

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import planner
from elastilm.runtime_py.orchestrator import Orchestrator, Request
from elastilm.runtime_py.serve import Service, create_app
from elastilm.runtime_py.serve.queue import FairQueue


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, service: Service):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Gate:
    """The real orchestrator, held at the start of each answer until `open` (to fill the queue on purpose)."""

    def __init__(self, orch):
        self.orch, self.gate = orch, threading.Event()
        self.tlm, self.engine, self.calibration, self.cost = orch.tlm, orch.engine, orch.calibration, orch.cost

    def answer(self, *a, **k):
        self.gate.wait(timeout=60)
        yield from self.orch.answer(*a, **k)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out, _ = tiny_build_with_tlm(tmp_path_factory)
    orch = Orchestrator(out, calibrate=False)  # fixed predictions, so answers can be compared across requests
    yield orch
    orch.close()


@pytest.fixture(scope="module")
def server(built):
    service = Service(built, "tiny", queue=4, max_tokens=8)
    srv = Server(service)
    yield srv, service
    srv.stop()
    service.close()


CHAT = {
    "messages": [
        {"role": "system", "content": " ".join(f"w{i}" for i in range(3, 25))},
        {"role": "user", "content": "w5 w6 w7"},
    ],
    "max_tokens": 6,
    "slo": {"ttft": 0.6, "tpot": 0.9},
}


def test_chat_answer_is_the_orchestrators_and_reports_the_plan(server, built):
    srv, _ = server
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    text = body["choices"][0]["message"]["content"]
    ext = body["elastilm"]
    assert set(ext) >= {"level", "prompt_ratio", "predicted_ms", "measured_ms", "slo_met", "budget_ms", "chosen_by"}
    assert ext["measured_ms"]["ttft"] > 0 and body["usage"]["completion_tokens"] == ext["tokens"] <= 6
    # the same request through the library gives the same plan and text (greedy)
    direct = built.answer(Request("w5 w6 w7", CHAT["messages"][0]["content"], True, planner.SLO(0.6, 0.9), 6))
    assert (direct.plan.level, direct.plan.ratio) == (ext["level"], ext["prompt_ratio"])
    assert direct.text == text


def test_streaming_matches_the_whole_answer(server):
    srv, _ = server
    whole = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, timeout=60).json()
    chunks = []
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        == whole["choices"][0]["message"]["content"]
    )
    assert events[-1]["elastilm"]["level"] == whole["elastilm"]["level"] and events[-1]["choices"][0]["finish_reason"]


def test_completions_models_health_metrics(server):
    srv, _ = server
    r = httpx.post(
        f"{srv.url}/v1/completions",
        json={"prompt": "w9 w10", "context": "w11 w12 w13", "max_tokens": 3, "slo": {"ttft_ms": 500, "tpot_ms": 50}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion" and isinstance(r.json()["choices"][0]["text"], str)
    models = httpx.get(f"{srv.url}/v1/models").json()["data"][0]
    assert models["id"] == "tiny" and len(models["levels"]) == 9
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'elastilm_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "elastilm_slo_total" in metrics and "elastilm_ttft_seconds_bucket" in metrics


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        ({**CHAT, "slo": {"ttft_ms": -5, "tpot_ms": 40}}, "greater than 0"),
        ({**CHAT, "slo": {"ttft_ms": 300, "tpot": 0.5}}, "either ttft_ms and tpot_ms"),
        ({**CHAT, "frequency_penality": 1}, "unknown field"),
        ({**CHAT, "messages": [{"role": "user", "content": " ".join(["w5"] * 80)}]}, "context window"),
        ({**CHAT, "messages": [{"role": "assistant", "content": "w5"}]}, "last message must be from the user"),
        ({**CHAT, "model": "gpt-9"}, "unknown model"),
        ({"messages": []}, "at least 1"),
        # strict parsing (issue 16, row 8): no coercion, no NaN, no runaway nesting, no negative seed
        ({**CHAT, "max_tokens": "5"}, "valid integer"),
        ({**CHAT, "stream": 1}, "valid boolean"),
        (json.dumps(CHAT)[:-1].encode() + b', "temperature": NaN}', "NaN is not a JSON number"),
        (json.dumps(CHAT)[:-1].encode() + b', "top_p": Infinity}', "Infinity is not a JSON number"),
        (b'{"user": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
        ({**CHAT, "seed": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_requests_get_400_with_the_reason_and_the_server_goes_on(server, body, reason):
    srv, _ = server
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"]
    assert httpx.post(f"{srv.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, timeout=60).status_code == 200


def test_api_key_full_queue_and_disconnect(built):
    gate = Gate(built)
    service = Service(gate, "tiny", queue=2, max_tokens=4, api_key="secret")
    srv = Server(service)
    auth = {"Authorization": "Bearer secret"}
    try:
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 401
        assert httpx.get(f"{srv.url}/health").status_code == 200  # health needs no key

        results = {}

        def call(name, timeout=60.0):
            try:
                results[name] = httpx.post(
                    f"{srv.url}/v1/chat/completions", json={**CHAT, "user": name}, headers=auth, timeout=timeout
                )
            except httpx.ReadTimeout as e:
                results[name] = e

        first = threading.Thread(target=call, args=("a",))
        first.start()
        _wait(lambda: service.busy)  # "a" holds the model (at the gate)
        second = threading.Thread(target=call, args=("b",))
        second.start()
        leaver = threading.Thread(target=call, args=("c", 3.0))  # gives up after 3 s
        leaver.start()
        _wait(lambda: len(service.queue) == 2)
        full = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, headers=auth, timeout=10)
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert "queue is full" in full.json()["error"]["message"]

        leaver.join(30)  # a waiting client that goes away frees its place in the queue
        assert isinstance(results["c"], httpx.ReadTimeout)
        _wait(lambda: len(service.queue) == 1)
        gate.gate.set()
        first.join(60)
        second.join(60)
        assert results["a"].status_code == 200 and results["b"].status_code == 200
        _wait(lambda: len(service.queue) == 0 and not service.busy)
    finally:
        gate.gate.set()
        srv.stop()
        service.close()


def _wait(cond, timeout: float = 30):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def test_fair_queue_round_robin_capacity_and_removal():
    class J:
        def __init__(self, app, n):
            self.app, self.n = app, n

    q = FairQueue(5)
    jobs = [J("a", 1), J("a", 2), J("a", 3), J("b", 1), J("c", 1)]
    assert all(q.put(j) is None for j in jobs)
    assert "full" in q.put(J("d", 1))
    assert q.remove(jobs[1]) and not q.remove(jobs[1])
    order = [q.get(timeout=0) for _ in range(4)]
    assert [(j.app, j.n) for j in order] == [("a", 1), ("b", 1), ("c", 1), ("a", 3)]
    assert q.get(timeout=0.01) is None and len(q) == 0


def test_each_app_holds_at_most_its_share_of_the_queue():
    class J:
        def __init__(self, app):
            self.app = app

    q = FairQueue(5, share=0.4)  # ceil(0.4 x 5) = 2 places per app
    assert [q.put(J("mail")) for _ in range(3)][2] == (
        "this app already has 2 requests waiting, its share of the 5 places"
    )
    assert all(q.put(J(app)) is None for app in ("notes", "notes", "chat"))
    assert "full" in q.put(J("maps"))
    assert q.get(timeout=0).app == "mail" and q.put(J("mail")) is None  # a place of its own freed: room again
    with pytest.raises(ValueError, match="share"):
        FairQueue(4, share=0)


def test_one_apps_burst_cannot_turn_another_app_away(built):
    """With the apps' keys, a request counts as its key's app (its "user" field cannot make it another): one app
    fills its share of the queue and is refused beyond it, while another app's request still gets in."""
    gate = Gate(built)
    service = Service(gate, "tiny", queue=4, max_tokens=4, app_keys={"mail": "k-mail", "notes": "k-notes"})
    srv = Server(service)
    results = {}

    def call(name, key, user=None):
        body = {**CHAT, "user": user} if user else CHAT
        results[name] = httpx.post(
            f"{srv.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    try:
        threads = [threading.Thread(target=call, args=("mail-running", "k-mail"))]
        threads[0].start()
        _wait(lambda: service.busy)  # mail's first request holds the model
        for i in range(2):
            threads.append(threading.Thread(target=call, args=(f"mail-{i}", "k-mail", f"disguise-{i}")))
            threads[-1].start()
        _wait(lambda: len(service.queue) == 2)
        burst = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={**CHAT, "user": "notes"},  # claims to be another app: still mail's
            headers={"Authorization": "Bearer k-mail"},
            timeout=10,
        )
        assert burst.status_code == 429 and "its share of the 4 places" in burst.json()["error"]["message"]
        assert int(burst.headers["Retry-After"]) >= 1
        threads.append(threading.Thread(target=call, args=("notes", "k-notes")))
        threads[-1].start()
        _wait(lambda: len(service.queue) == 3)  # the other app got in
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 401
        gate.gate.set()
        for t in threads:
            t.join(60)
        assert {n: r.status_code for n, r in results.items()} == dict.fromkeys(
            ["mail-running", "mail-0", "mail-1", "notes"], 200
        )
    finally:
        gate.gate.set()
        srv.stop()
        service.close()
    with pytest.raises(ElastiLMError, match="two apps share one key"):
        Service(gate, "tiny", app_keys={"a": "k", "b": "k"})


def test_multiple_choice_and_baseline_strategies(server, built):
    """Options are scored like the harness scores them (per-character log-likelihood after the compressed prompt,
    calibrated by a content-free prompt); a baseline strategy plans its own way."""
    from elastilm.runtime_py.choice import option_scores
    from elastilm.runtime_py.compress import compress

    srv, _ = server
    body = {
        "prompt": "w5 w6",
        "context": " ".join(f"w{i}" for i in range(20, 40)),
        "options": [" w7", " w8 w9", " w10"],
        "calibration": "w2",
        "max_tokens": 2,
        "slo": {"ttft": 0.5, "tpot": 0.9},
    }
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ext = r.json()["elastilm"]
    parts = built.parts("w5 w6", body["context"], chat=False)
    c = compress(parts, ext["prompt_ratio"], built.tlm, built.engine.tokenizer, question="w5 w6")
    enc = built.engine.encode
    opts = [enc(o) for o in body["options"]]
    chars = [len(o) for o in body["options"]]
    plain = option_scores(built.engine, 0, c.ids, opts, ext["level"], chars)
    context = c.ids[: len(c.ids) - len(enc("w5 w6"))]
    null = option_scores(built.engine, 0, context + enc("w2"), opts, ext["level"], chars)
    expected = [a - b for a, b in zip(plain, null)]
    assert ext["option_scores"] == pytest.approx(expected, abs=1e-3)
    assert ext["choice"] == int(max(range(3), key=lambda i: expected[i]))

    full = httpx.post(f"{srv.url}/v1/completions", json={**body, "strategy": "full"}, timeout=60).json()["elastilm"]
    assert (full["level"], full["prompt_ratio"], full["chosen_by"]) == (1.0, 1.0, "full")
    bad = httpx.post(f"{srv.url}/v1/completions", json={**body, "strategy": "oracle"}, timeout=30)
    assert bad.status_code == 400 and "unknown strategy 'oracle'" in bad.json()["error"]["message"]


def test_trace_arrivals_and_shares():
    from elastilm.evaluate import trace

    for alpha in (0.0, 0.25, -0.25):
        t = trace.make_trace(60, alpha, rate=2.0, seed=1)
        assert len(t) == 60 and t == trace.make_trace(60, alpha, rate=2.0, seed=1)
        times = [r.at for r in t]
        assert times == sorted(times) and 10 < times[-1] < 60  # Poisson at 2/s: about 30 s
        counts = [sum(r.app == a for r in t) for a in trace.APPS]
        w = np.exp(alpha * np.arange(6))
        assert np.all(np.abs(np.array(counts) - 60 * w / w.sum()) < 1)  # largest-remainder rounding of the shares
    body = trace.request_body(trace.make_trace(12, 0.0, 1.0, 0)[0], "model-only")
    assert body["strategy"] == "model-only" and body["max_tokens"] == trace.GENERATED and len(body["options"]) >= 2
    docs = next(r for r in trace.make_trace(60, 0.25, 1.0, 0) if r.app.passage)
    assert "Passage: " in trace.request_body(docs, "elastilm")["context"]


def test_trace_replay_over_http_and_summary(server, monkeypatch, tmp_path):
    """A short trace through the real service (prompts shortened to the tiny model's window), then the summary
    figures against a hand count."""
    from elastilm.evaluate import tasks, trace, trace_report

    srv, _ = server
    item = tasks.Item("x", "w5 w6", (" w7", " w8"), 1)
    requests = [trace.Request(0.05 * i, trace.APPS[i % 2], item) for i in range(4)]
    monkeypatch.setattr(
        trace,
        "request_body",
        lambda r, s: {
            "prompt": "w5 w6",
            "context": "w9 w10 w11 w12",
            "options": [" w7", " w8"],
            "max_tokens": 3,
            "strategy": s,
            "slo": {"ttft": r.app.ttft, "tpot": r.app.tpot},
            "user": r.app.name,
        },
    )
    rows = [
        {**r, "alpha": 0.0}
        for s in ("elastilm", "smallest", "layer-drop")
        for r in trace.replay(srv.url, requests, s, progress=False)
    ]
    assert len(rows) == 12 and all(r["ok"] for r in rows)
    assert all(
        r["level"] == 0.2 and r["ratio"] == 1.0 and r["layers_dropped"] == 0
        for r in rows
        if r["strategy"] == "smallest"
    )
    dropping = [r for r in rows if r["strategy"] == "layer-drop"]
    assert all(r["level"] == 1.0 for r in dropping) and {
        r["layers_dropped"] for r in dropping if r["app"] == "Rewind"
    } == {0}
    assert {r["layers_dropped"] for r in dropping if r["app"] == "GMail"} == {
        1
    }  # TPOT 0.9 of full: 3 of the 4 layers fit
    table = trace_report.summarize(rows, tmp_path, [a.name for a in trace.APPS])
    overall = {r["strategy"]: r for r in table if r["app"] == "all"}
    for s in ("elastilm", "smallest", "layer-drop"):
        sel = [r for r in rows if r["strategy"] == s]
        assert overall[s]["n"] == 4
        assert overall[s]["accuracy"] == pytest.approx(sum(r["correct"] for r in sel) / 4)
        assert overall[s]["accuracy_within_slo"] == pytest.approx(sum(r["correct"] * r["slo_met"] for r in sel) / 4)
    assert (tmp_path / "trace.png").is_file() and "accuracy within slo" in (tmp_path / "trace.md").read_text().lower()


def test_trace_run_warms_the_service_up_and_replays_every_strategy(server, monkeypatch, tmp_path):
    """`run` with the default strategies: warm-up requests first (not recorded), then one replay per strategy,
    resumable: a second run sends nothing new."""
    from elastilm.evaluate import trace
    from elastilm.runtime_py.planner import STRATEGIES

    srv, _ = server
    sent: list[str] = []

    def body(r, s):
        sent.append(s)
        return {
            "prompt": "w5 w6",
            "context": "w9 w10 w11",
            "options": [" w7", " w8"],
            "max_tokens": 2,
            "strategy": s,
            "slo": {"ttft": r.app.ttft, "tpot": r.app.tpot},
            "user": r.app.name,
        }

    monkeypatch.setattr(trace, "request_body", body)
    table = trace.run(srv.url, 3, [0.0], None, rate=50.0, seed=0, out=tmp_path, progress=False, warmup=2)
    assert sent[:2] == ["full", "full"] and len(sent) == 2 + 3 * len(
        STRATEGIES
    )  # this server never calibrates: 2 warm-ups
    assert {r["strategy"] for r in table if r["app"] == "all"} == set(STRATEGIES)
    rows = trace.read_rows(tmp_path / "trace-requests.csv")
    assert len(rows) == 3 * len(STRATEGIES) and all(r["ok"] == 1 for r in rows)
    sent.clear()
    trace.run(srv.url, 3, [0.0], None, rate=50.0, seed=0, out=tmp_path, progress=False, warmup=0)
    assert sent == []


@pytest.fixture(scope="module")
def client(built):
    """The official OpenAI Python client against the service, with an API key, the way users call it."""
    import openai

    service = Service(built, "tiny", queue=4, max_tokens=8, api_key="secret")
    srv = Server(service)
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="secret", max_retries=0, timeout=60), srv
    srv.stop()
    service.close()


def _library(built, sampling=None, **fields):
    """The same chat request answered by the library: the service must give this text."""
    from elastilm.runtime_py.sampling import Sampling

    request = Request("w5 w6 w7", CHAT["messages"][0]["content"], True, planner.SLO(0.6, 0.9), 6)
    request.sampling = sampling or Sampling(**fields)
    return built.answer(request)


def test_openai_client_chat_streaming_usage_and_the_slo_extension(client, built):
    c, _ = client
    chat = {"model": "tiny", "messages": CHAT["messages"], "max_tokens": 6, "extra_body": {"slo": CHAT["slo"]}}
    r = c.chat.completions.create(**chat)
    direct = _library(built)
    assert r.choices[0].message.content == direct.text and r.choices[0].finish_reason == direct.finish_reason
    assert r.usage.completion_tokens == direct.tokens and r.usage.prompt_tokens == direct.compressed.achieved
    assert r.model_extra["elastilm"]["level"] == direct.plan.level
    chunks = list(c.chat.completions.create(**chat, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == direct.text
    assert chunks[-1].choices[0].finish_reason == direct.finish_reason and chunks[-1].usage.completion_tokens
    # the newer name of the limit, and completions with the context extension
    r = c.chat.completions.create(**{**chat, "max_tokens": None, "max_completion_tokens": 2})
    assert r.usage.completion_tokens <= 2
    text = c.completions.create(model="tiny", prompt="w9 w10", max_tokens=3, extra_body={"context": "w11 w12 w13"})
    assert text.object == "text_completion" and text.usage.completion_tokens <= 3


def test_openai_client_penalties_and_stop_sequences(client, built):
    from elastilm.runtime_py.sampling import Sampling

    c, _ = client
    chat = {"model": "tiny", "messages": CHAT["messages"], "max_tokens": 6, "extra_body": {"slo": CHAT["slo"]}}
    penalties = {"frequency_penalty": 1.5, "presence_penalty": 1.0}
    r = c.chat.completions.create(
        **{**chat, "extra_body": {**chat["extra_body"], "repetition_penalty": 2.0}}, **penalties
    )
    direct = _library(built, **penalties, repetition_penalty=2.0)
    assert r.choices[0].message.content == direct.text
    assert direct.text != _library(built).text  # the penalties reached the engine

    plain = _library(built).text
    stop = plain[len(plain) // 2 : len(plain) // 2 + 2]
    assert stop.strip()
    r = c.chat.completions.create(**chat, stop=[stop, "never"])
    assert r.choices[0].message.content == plain[: plain.find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == _library(built, Sampling(stop=(stop,))).text
    streamed = list(c.chat.completions.create(**chat, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == r.choices[0].message.content


def test_openai_client_sees_clear_errors(client):
    import openai

    c, srv = client
    with pytest.raises(openai.BadRequestError, match="less than or equal to 2"):
        c.chat.completions.create(model="tiny", messages=CHAT["messages"], frequency_penalty=3)
    with pytest.raises(openai.BadRequestError, match="at most 4 non-empty strings"):
        c.chat.completions.create(model="tiny", messages=CHAT["messages"], stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in c.models.list()] == ["tiny"]


# -- hostile input and faults (issue 16; README "Bad input and faults") --------------------------------------------


def test_a_body_without_json_content_type_is_refused(server):
    srv, _ = server
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_an_oversized_body_gets_413_before_parsing_while_health_answers(server):
    """A body over the limit (1 MiB) is refused by its Content-Length before it is read; one streamed without a
    length is cut off once it passes the limit. /health answers within 100 ms while the slow one uploads."""
    srv, _ = server
    big = b'{"prompt": "' + b"w" * (2 << 20) + b'"}'
    r = httpx.post(f"{srv.url}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "accepts at most 1048576" in r.json()["error"]["message"]

    def slow():  # chunked, no Content-Length: 64 KiB every 20 ms
        yield b'{"prompt": "'
        for _ in range(40):
            time.sleep(0.02)
            yield b"w" * (64 << 10)

    result = {}
    upload = threading.Thread(
        target=lambda: result.setdefault(
            "r",
            httpx.post(
                f"{srv.url}/v1/completions", content=slow(), headers={"content-type": "application/json"}, timeout=60
            ),
        )
    )
    upload.start()
    time.sleep(0.1)
    worst = 0.0
    with httpx.Client(base_url=srv.url, timeout=5) as probe:  # one client: the time is the server's, not setup's
        probe.get("/health")
        for _ in range(5):
            t = time.perf_counter()
            assert probe.get("/health").status_code == 200
            worst = max(worst, time.perf_counter() - t)
    upload.join(60)
    assert result["r"].status_code == 413
    assert worst < 0.1, worst


def test_text_over_the_character_cap_is_refused_before_tokenizing(server):
    srv, service = server
    body = {"prompt": "w5 " * (service.max_chars // 3 + 10), "max_tokens": 1}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and f"accepts at most {service.max_chars}" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "options, reason",
    [
        ([" w7", ""], "every option must hold text"),
        ([" w7", "  "], "every option must hold text"),
        ([f" w{i}" for i in range(17)], "at most 16 items"),
        ([" w7", " w8" * 70], "longest option"),
    ],
)
def test_bad_options_get_400_before_any_model_work(server, options, reason):
    srv, service = server
    answered = service.metrics.requests.labels("/v1/completions", "200")._value.get()
    body = {"prompt": "w5 w6", "options": options, "max_tokens": 2}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
    assert service.metrics.requests.labels("/v1/completions", "200")._value.get() == answered


class Broken:
    """The real orchestrator whose answers fail inside the server, with a message that must not reach clients."""

    def __init__(self, orch):
        self.tlm, self.engine, self.calibration, self.cost = orch.tlm, orch.engine, orch.calibration, orch.cost

    def answer(self, *a, **k):
        raise RuntimeError("TVMError: /home/secret/model.so: segfault in fused_kernel_42")
        yield


def test_an_internal_error_is_a_500_with_an_id_and_its_details_only_in_the_log(built, caplog):
    service = Service(Broken(built), "tiny", max_tokens=4)
    srv = Server(service)
    try:
        with caplog.at_level("ERROR", logger="elastilm.serve"):
            for stream in (False, True):
                r = httpx.post(f"{srv.url}/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
                assert r.status_code == 500
                message = r.json()["error"]["message"]
                assert "internal error" in message and "secret" not in message and "TVMError" not in message
                error_id = message.split()[2].rstrip(";")
                assert any(error_id in rec.getMessage() and "secret" in rec.exc_text for rec in caplog.records)
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"  # the server goes on
    finally:
        srv.stop()
        service.close()


def test_with_a_key_only_a_bare_liveness_answer_is_open(built):
    service = Service(built, "tiny", max_tokens=4, api_key="s3cret")
    srv = Server(service)
    try:
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        for wrong in ("Bearer s3cre", "Bearer s3cret2", "s3cret", ""):
            assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": wrong}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert "queued" in httpx.get(f"{srv.url}/health", headers=auth).json()
        assert httpx.get(f"{srv.url}/metrics", headers=auth).status_code == 200
    finally:
        srv.stop()
        service.close()


def test_a_loopback_server_answers_only_to_loopback_host_names(built):
    """DNS rebinding: a page on evil.example resolves its name to 127.0.0.1 and calls the local service."""
    from elastilm.runtime_py.device import LOOPBACK

    service = Service(built, "tiny", max_tokens=4, hosts=LOOPBACK)
    srv = Server(service)
    try:
        evil = httpx.get(f"{srv.url}/v1/models", headers={"Host": "evil.example"})
        assert evil.status_code == 400 and "not Host: evil.example" in evil.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/v1/models", headers={"Host": f"localhost:{srv.port}"}).status_code == 200
        assert httpx.get(f"{srv.url}/v1/models", headers={"Host": f"[::1]:{srv.port}"}).status_code == 200
        assert httpx.get(f"{srv.url}/v1/models").status_code == 200  # 127.0.0.1:port
    finally:
        srv.stop()
        service.close()


class Dying:
    """The real orchestrator whose worker thread dies (an error that is not an Exception, as a C extension's
    abort would surface)."""

    def __init__(self, orch):
        self.tlm, self.engine, self.calibration, self.cost = orch.tlm, orch.engine, orch.calibration, orch.cost

    def answer(self, *a, **k):
        raise SystemExit("the worker thread ends here")
        yield


def test_a_dead_worker_makes_health_503_and_requests_get_a_clear_503(built):
    events = []
    service = Service(Dying(built), "tiny", max_tokens=4, on_unhealthy=events.append)
    srv = Server(service)
    try:
        first = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert first.status_code == 503 and "the worker has stopped" in first.json()["error"]["message"]
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        later = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert later.status_code == 503
        _wait(lambda: events == ["the worker has stopped"])
    finally:
        srv.stop()
        service.close()


def test_a_stuck_step_makes_health_503_and_the_waiting_requests_get_503(built):
    gate, events = Gate(built), []
    service = Service(gate, "tiny", max_tokens=4, step_deadline=1.0, on_unhealthy=events.append)
    srv = Server(service)
    try:
        results = {}

        def call(name):
            results[name] = httpx.post(f"{srv.url}/v1/chat/completions", json={**CHAT, "user": name}, timeout=30)

        threads = [threading.Thread(target=call, args=(n,)) for n in ("held", "waiting")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [results[n].status_code for n in ("held", "waiting")] == [503, 503]
        assert "no progress for more than 1 s" in results["waiting"].json()["error"]["message"]
        assert httpx.get(f"{srv.url}/health").status_code == 503
        _wait(lambda: len(events) == 1)
    finally:
        gate.gate.set()
        srv.stop()
        service.close()


def _json_values():
    from hypothesis import strategies as st

    scalars = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


def _bodies():
    """Request bodies near the real ones: the real field names with any JSON values, real bodies with one field
    replaced, and arbitrary bytes."""
    from hypothesis import strategies as st

    fields = st.sampled_from(
        [
            "messages",
            "prompt",
            "context",
            "options",
            "calibration",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "stream",
            "slo",
            "strategy",
            "model",
            "n",
            "user",
            "frequency_penalty",
            "repetition_penalty",
        ]
    )
    near = st.dictionaries(fields, _json_values(), max_size=6)
    mutated = st.tuples(fields, _json_values()).map(lambda kv: {**CHAT, "max_tokens": 2, kv[0]: kv[1]})
    raw = st.binary(max_size=200)
    return st.one_of(near.map(json.dumps), mutated.map(json.dumps), raw)


def test_fuzzed_request_bodies_never_get_a_500_and_the_server_goes_on(server):
    """Property: whatever body arrives (hypothesis), the answer is 200, 400, 413 or 429, in time, and the server
    still answers a good request afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    srv, _ = server
    client = httpx.Client(base_url=srv.url, timeout=30, headers={"content-type": "application/json"})

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies(), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def check(body, path):
        data = body if isinstance(body, bytes) else body.encode()
        r = client.post(path, content=data)
        assert r.status_code in (200, 400, 413, 429), (r.status_code, r.text, data[:200])
        assert "error" in r.json() or r.status_code == 200

    check()
    assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200
    assert client.get("/health").status_code == 200
    client.close()


def _short_body(r, strategy):
    """A trace request's body in words the tiny model knows, varied by question (prompts fit its window)."""
    import zlib

    h = zlib.crc32(r.item.id.encode()) % 7
    return {
        "prompt": f"w5 w{6 + h}",
        "context": f"w9 w10 w{11 + h} w12",
        "options": [f" w{20 + i}" for i in range(len(r.item.options))],
        "max_tokens": 3,
        "strategy": strategy,
        "slo": {"ttft": r.app.ttft, "tpot": r.app.tpot},
        "user": r.app.name,
    }


def test_the_simulator_reproduces_a_hand_computed_trace(built, tmp_path):
    """Fixed latency scatter (0.99 of the prediction) and a hand-written outcome grid: plans, SLOs, queueing and
    the report equal a count by hand. The tiny profile predicts TTFT = level x tokens ms, TPOT = 1 + level ms."""
    import csv

    from elastilm.evaluate import outcomes, simulate, tasks, trace, trace_report
    from elastilm.evaluate.grid import answered_by

    apps = {a.name: a for a in trace.APPS}
    item = lambda i: tasks.Item(f"q{i}", "", ("a", "b"), 1)  # noqa: E731
    requests = [
        trace.Request(0.0, apps["Rewind"], item(0)),  # <1.0, 1.0>
        trace.Request(0.0, apps["Rewind"], item(1)),
        trace.Request(0.0, apps["GMail"], item(2)),  # <0.8, 0.9>
        trace.Request(10.0, apps["XiaoAi"], item(3)),  # <0.2, 0.5>: no level reaches TPOT 0.5 x 2 ms
    ]
    levels = built.tlm.levels
    grid = tmp_path / "outcomes.csv"
    with grid.open("w", newline="") as f:
        w = csv.DictWriter(f, outcomes.FIELDS)
        w.writeheader()
        for r in requests:
            for ratio, lv, dropped in outcomes.plans(built):
                w.writerow(
                    dict(app=r.app.name, id=r.item.id, ratio=ratio, level=lv, dropped=dropped, tokens=0, original=0,
                         choice=int(lv >= 0.5), correct=int(lv >= 0.5), score_ms=5.0, build=answered_by(built.engine.folder))
                )  # fmt: skip
    scatter = simulate.Scatter.constant(0.99, 0.99)
    runs = [(0.0, s) for s in ("full", "model-only", "smallest")]
    rows = simulate.simulate(built, {0.0: requests}, runs, scatter, 0, grid, _short_body, progress=False)
    tokens = {  # each prompt's length: context + query
        r.item.id: sum(len(built.engine.encode(_short_body(r, "full")[k])) for k in ("context", "prompt"))
        for r in requests
    }
    by = {(r["strategy"], r["id"]): r for r in rows}
    gmail = max(lv for lv in levels if lv <= 0.8 + 1e-9)
    expected_level = {
        "full": [1.0, 1.0, 1.0, 1.0],
        "model-only": [1.0, 1.0, gmail, min(levels)],
        "smallest": [min(levels)] * 4,
    }
    expected_met = {"full": [1, 1, 0, 0], "model-only": [1, 1, 1, 0], "smallest": [1, 1, 1, 0]}
    for s in expected_level:
        for i in range(4):
            r = by[(s, f"q{i}")]
            lv = expected_level[s][i]
            assert r["level"] == lv and r["ratio"] == 1.0 and r["layers_dropped"] == 0
            assert r["ttft_ms"] == pytest.approx(0.99 * lv * tokens[f"q{i}"], abs=0.06)
            assert r["tpot_ms"] == pytest.approx(0.99 * (1 + lv), abs=0.06)
            assert r["slo_met"] == expected_met[s][i], (s, i)
            assert r["correct"] == int(lv >= 0.5)
        # one worker, the fair queue round-robin over apps: Rewind q0, GMail q2, then Rewind q1; XiaoAi alone later
        busy = {i: by[(s, f"q{i}")]["ttft_ms"] + 2 * by[(s, f"q{i}")]["tpot_ms"] + 5.0 for i in range(4)}
        assert by[(s, "q0")]["e2e_ms"] == pytest.approx(busy[0], abs=0.2)
        assert by[(s, "q2")]["e2e_ms"] == pytest.approx(busy[0] + busy[2], abs=0.2)
        assert by[(s, "q1")]["e2e_ms"] == pytest.approx(busy[0] + busy[2] + busy[1], abs=0.2)
        assert by[(s, "q3")]["e2e_ms"] == pytest.approx(busy[3], abs=0.2)
    table = trace_report.summarize(rows, tmp_path, [a.name for a in trace.APPS])
    within = {r["strategy"]: r["accuracy_within_slo"] for r in table if r["app"] == "all"}
    assert within == {"full": 0.5, "model-only": 0.75, "smallest": 0.0}
    gaps = {g["strategy"]: g["gap"] for g in simulate.paired_gaps(rows, "model-only") if g["alpha"] == "all"}
    assert gaps == {"full": 25.0, "smallest": 75.0}


def test_validation_replays_a_trace_then_simulates_it_request_by_request(server, built, monkeypatch, tmp_path):
    """`bench trace` against the real service, then `--validate`: the outcome grid is filled through the
    service's own scoring, and every simulated request has the replayed plan and answer (the fixture's service
    does not calibrate, so plans cannot drift with the latency draws)."""
    from elastilm.evaluate import outcomes, simulate, trace

    srv, _ = server
    monkeypatch.setattr(trace, "request_body", _short_body)
    strategies = ["elastilm", "model-only", "layer-drop", "no-adapters", "no-score-head"]
    trace.run(srv.url, 8, [0.0], strategies, 20.0, 0, tmp_path, progress=False, warmup=0, questions=3)
    assert json.loads((tmp_path / "trace.json").read_text())["questions"] == 3
    with pytest.raises(ElastiLMError, match="another --out"):
        trace.run(srv.url, 9, [0.0], strategies, 20.0, 0, tmp_path, progress=False, warmup=0, questions=3)
    grid = tmp_path / "outcomes.csv"
    table = simulate.validate(built, tmp_path, grid, _short_body, progress=False)
    agree = {r["strategy"]: r for r in table}
    assert set(agree) == {*strategies, "all"} and agree["all"]["n"] == 8 * len(strategies)
    assert all(r["same_plan"] == 100.0 and r["same_correct"] == 100.0 for r in table), table
    rows = grid.read_text().splitlines()
    assert len(outcomes.read(grid, rows[1].split(",")[-1])) == len(rows) - 1 > 0
    simulate.validate(built, tmp_path, grid, _short_body, progress=False)
    assert grid.read_text().splitlines() == rows  # resumed: nothing answered twice
    assert "same plan" in (tmp_path / "trace-agreement.md").read_text()
    # --simulate: new traces (two alphas, two seeds) with this replay's scatter, their outcomes filled on demand
    out = tmp_path / "sim"
    table = simulate.run(
        built.engine.folder, tmp_path, [0.0, 0.25], ["elastilm", "smallest"], 12, 20.0, [0, 1], 3, 0, grid, out, False
    )
    sim = trace.read_rows(out / "trace-requests.csv")
    assert len(sim) == 2 * 2 * 2 * 12 and {r["seed"] for r in sim} == {"0", "1"}
    assert {r["app"] for r in table} >= {"all"} and (out / "trace-gaps.png").is_file()
    have = outcomes.read(grid, rows[1].split(",")[-1])
    assert all((r["app"], r["id"], r["ratio"], r["level"], r["layers_dropped"], "") in have for r in sim)
