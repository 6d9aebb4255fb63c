"""The engine over TVM RPC on loopback: a real RPC server (and tracker), outputs equal to a local run."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import elastified_tiny, random_adapters
from tvm import rpc
from tvm.rpc.tracker import Tracker

from elastilm.compile.build import build
from elastilm.formats import adapters as adapters_file
from elastilm.formats import elastic as artifact
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import device
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.runtime_py.session import DeviceLost


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """With recovery adapters, so that the device also holds and switches each level's adapter set."""
    out = elastified_tiny(tmp_path_factory, "llama")
    adapters_file.save(
        out, random_adapters(artifact.load(out, with_tokenizer=False), 4, seed=5), {"note": "random, for tests"}
    )
    return build(out, "host-cpu", max_len=40)


@pytest.fixture(scope="module")
def local(built):
    return ElasticEngine(built)


@pytest.fixture
def device_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(device.CACHE_ENV, str(tmp_path / "device-cache"))  # inherited by the server process
    return tmp_path / "device-cache"


def start_server(port=9100, **kw):
    return rpc.Server(
        "127.0.0.1", port=port, port_end=port + 50, server_init_callback=device.register, silent=True, **kw
    )


def prompt(engine, length, seed):
    return np.random.default_rng(seed).integers(0, engine.elastic["config"]["vocab_size"], length).tolist()


def greedy(engine, ids, level, n=10):
    return list(engine.generate_ids(ids, level, max_new_tokens=n))


def test_generate_over_rpc_equals_local_and_uploads_once(built, local, device_cache):
    server = start_server()
    try:
        ids = prompt(local, 7, 3)
        first = ElasticEngine(built, rpc=f"127.0.0.1:{server.port}")
        for level in (1.0, 0.5, 0.2):
            np.testing.assert_allclose(first.prefill(ids, level), local.prefill(ids, level), rtol=0, atol=1e-6)
            assert greedy(first, ids, level) == greedy(local, ids, level)
        plain = ElasticEngine(built, adapters=False)  # the adapters took part on the device
        assert np.abs(first.prefill(ids, 0.5) - plain.prefill(ids, 0.5)).max() > 1e-2
        assert first.session.uploaded_bytes > 0
        cached = sorted(p.name for p in device_cache.rglob("*") if p.is_file())
        assert "model.so" in cached and "tensor-cache.json" in cached
        first.close()  # the server serves one session at a time
        second = ElasticEngine(built, rpc=f"127.0.0.1:{server.port}")  # a new session finds everything cached
        assert second.session.uploaded_bytes == 0
        assert greedy(second, ids, 0.5) == greedy(local, ids, 0.5)
        second.close()
    finally:
        server.terminate()


def test_tracker_and_a_stock_server_without_the_cache(built, local):
    tracker = Tracker("127.0.0.1", port=9200, port_end=9250, silent=True)
    server = rpc.Server(
        "127.0.0.1", port=9300, port_end=9350, tracker_addr=("127.0.0.1", tracker.port), key="phone", silent=True
    )
    try:
        engine = ElasticEngine(built, tracker=f"127.0.0.1:{tracker.port}", key="phone")
        ids = prompt(local, 5, 8)
        assert greedy(engine, ids, 0.7) == greedy(local, ids, 0.7)
        assert engine.session.uploaded_bytes > 0  # a stock server keeps uploads for one session only
        engine.close()
    finally:
        server.terminate()
        tracker.terminate()


def test_disconnect_mid_generation_resumes_with_the_same_tokens(built, local, device_cache):
    server = start_server(port=9400)
    port = server.port
    ids = prompt(local, 6, 5)
    engine = ElasticEngine(built, rpc=f"127.0.0.1:{port}")
    tokens = engine.generate_ids(ids, 0.5, max_new_tokens=12)
    got = [next(tokens) for _ in range(4)]
    server.terminate()  # the device goes away with the KV cache ...
    server = start_server(port=port)  # ... and comes back empty
    try:
        got += list(tokens)
        assert got == greedy(local, ids, 0.5, n=12)
        engine.close()
    finally:
        server.terminate()


def test_unreachable_device_names_the_endpoint(built):
    with pytest.raises(ElastiLMError, match="cannot reach the device at rpc 127.0.0.1:9 "):
        ElasticEngine(built, rpc="127.0.0.1:9")
    with pytest.raises(ElastiLMError, match="host:port"):
        ElasticEngine(built, rpc="phone")


class DeviceProcess:
    """`elastilm device serve` in a process group of its own, so that the whole server (its accept loop and the
    session it forked) can be stopped (SIGSTOP: a frozen phone, a half-open link) or killed."""

    def __init__(self, cache: Path, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elastilm", "device", "serve", "--port", str(port), "--cache", str(cache)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        banner = self.proc.stdout.readline()
        assert "serving on 127.0.0.1:" in banner, banner
        self.port = int(banner.split("serving on 127.0.0.1:")[1].split(";")[0])

    def signal(self, sig) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(30)


def test_a_stopped_device_fails_within_the_deadline_and_a_rebooting_one_is_reconnected_to(built, local, tmp_path):
    ids = prompt(local, 6, 7)
    expected = greedy(local, ids, 0.5, n=12)
    devices = [DeviceProcess(tmp_path / "cache", 9800)]
    port = devices[0].port
    try:
        engine = ElasticEngine(built, rpc=f"127.0.0.1:{port}", rpc_timeout=2, reconnect_for=3)
        tokens = engine.generate_ids(ids, 0.5, max_new_tokens=12)
        got = [next(tokens) for _ in range(3)]
        devices[0].signal(signal.SIGSTOP)  # mid-stream: the next decode call never gets an answer
        start = time.monotonic()
        with pytest.raises(DeviceLost, match=f"cannot reach the device at rpc 127.0.0.1:{port} "):
            list(tokens)
        waited = time.monotonic() - start
        assert 4 < waited < 12, waited  # the 2 s deadline, then 3 s of reconnecting (each try at most 2 s)
        devices[0].signal(signal.SIGCONT)  # it answers again: the next request reconnects
        assert greedy(engine, ids, 0.5, n=12) == expected

        engine.session.reconnect_for = 30  # a rebooting phone: gone mid-stream, back on its port 2 s later
        tokens = engine.generate_ids(ids, 0.5, max_new_tokens=12)
        got = [next(tokens) for _ in range(3)]
        devices[0].kill()
        reboot = threading.Timer(2.0, lambda: devices.append(DeviceProcess(tmp_path / "cache", port)))
        reboot.start()
        got += list(tokens)
        reboot.join()
        assert devices[-1].port == port and got == expected
        assert engine.session.connections == 3
        engine.close()
    finally:
        for d in devices:
            d.kill()


def test_the_service_answers_or_refuses_every_request_clearly_when_the_device_stops_then_dies(
    tmp_path_factory, tmp_path
):
    """A real `elastilm serve` on a real device server: the device stops (SIGSTOP) with requests in flight and
    queued, then is killed; each request gets its answer or a 503 naming the device within its deadline, the
    service stays up, and once a device is back on the port the next request is answered."""
    import httpx
    from conftest import tiny_build_with_tlm

    from elastilm.evaluate.trace import start_service

    out, _ = tiny_build_with_tlm(tmp_path_factory)
    device_server = DeviceProcess(tmp_path / "cache", 9850)
    endpoint = f"127.0.0.1:{device_server.port}"
    service, url = start_service(out, tmp_path / "serve.log", rpc=endpoint, rpc_timeout=2, reconnect_for=3)
    body = {"prompt": "w5 w6 w7", "max_tokens": 5, "slo": {"ttft": 0.9, "tpot": 0.9}}
    revived = None
    try:
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        device_server.signal(signal.SIGSTOP)
        results = {}

        def call(name, stream):
            start = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", json={**body, "stream": stream, "user": name}, timeout=60)
            results[name] = (r.status_code, r.text, time.monotonic() - start)

        clients = [threading.Thread(target=call, args=(f"app{i}", i == 0)) for i in range(3)]
        for c in clients:
            c.start()
        time.sleep(3.5)  # past the 2 s deadline of the request in flight: a stall, not a broken link
        device_server.kill()
        for c in clients:
            c.join(60)
        for name, (status, text, seconds) in results.items():
            assert seconds < 20, (name, seconds)  # queued behind each other: 2 s deadline + 3 s reconnecting each
            assert f"device at rpc {endpoint}" in text and "retry later" in text, text
            assert status == 503 or (name == "app0" and '"code": 503' in text), text  # a begun stream: its last event
        assert len(results) == 3
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        revived = DeviceProcess(tmp_path / "cache", device_server.port)
        assert revived.port == device_server.port
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        service.terminate()
        service.wait(30)
        device_server.kill()
        if revived is not None:
            revived.kill()


def test_sigterm_stops_accepting_lets_the_request_in_flight_finish_and_exits_0(tmp_path_factory, tmp_path):
    """A real `elastilm serve` process gets SIGTERM while a request is in flight (held up by a stopped device): the
    port stops accepting at once, the request still gets its answer, and the process exits 0 within the grace."""
    import httpx
    from conftest import tiny_build_with_tlm

    from elastilm.evaluate.trace import start_service

    out, _ = tiny_build_with_tlm(tmp_path_factory)
    device_server = DeviceProcess(tmp_path / "cache", 9870)
    service, url = start_service(
        out, tmp_path / "serve.log", rpc=f"127.0.0.1:{device_server.port}", rpc_timeout=3, reconnect_for=1
    )
    body = {"prompt": "w5 w6 w7", "max_tokens": 5, "slo": {"ttft": 0.9, "tpot": 0.9}}
    try:
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        device_server.signal(signal.SIGSTOP)
        result = {}
        in_flight = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=60))
        )
        in_flight.start()
        time.sleep(1.0)  # the request is on the worker, waiting for the device
        start = time.monotonic()
        service.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
        in_flight.join(30)
        assert result["r"].status_code == 503 and "cannot reach the device" in result["r"].text
        assert service.wait(30) == 0
        assert time.monotonic() - start < 30
    finally:
        if service.poll() is None:
            service.kill()
        device_server.signal(signal.SIGCONT)
        device_server.kill()


def test_cli_device_serve_runs_until_interrupted(built, local, tmp_path):
    """`elastilm device serve` as a user starts it: a separate process, loopback, stopped with Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "elastilm", "device", "serve", "--port", "9500", "--cache", str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = proc.stdout.readline()
        assert "serving on 127.0.0.1:" in banner, banner
        port = int(banner.split("serving on 127.0.0.1:")[1].split(";")[0])
        engine = ElasticEngine(built, rpc=f"127.0.0.1:{port}")
        ids = prompt(local, 5, 11)
        assert greedy(engine, ids, 1.0, n=6) == greedy(local, ids, 1.0, n=6)
        engine.close()
        assert any((tmp_path / "cache").rglob("model.so"))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_service_over_rpc_from_a_bundle_plans_like_a_local_run(tmp_path_factory, device_cache, tmp_path):
    """The LLM and the TLM both run on the device; plans, compressed prompts and answers equal a local run's."""
    import httpx
    from conftest import tiny_build_with_tlm

    from elastilm.compile.package import package
    from elastilm.evaluate.trace import start_service as spawn
    from elastilm.runtime_py.orchestrator import Orchestrator, Request
    from elastilm.runtime_py.planner import SLO, TLMCost

    out, _ = tiny_build_with_tlm(tmp_path_factory)
    bundle = package([out], tmp_path / "bundle")
    local = Orchestrator(out, calibrate=False)
    server = start_server(port=9600)
    endpoint = f"127.0.0.1:{server.port}"
    try:
        remote = Orchestrator(out, ElasticEngine(out, rpc=endpoint), calibrate=False)
        remote.cost = local.cost  # each measured its TLM's time; on a loaded machine they differ, and so would plans
        query = "w5 w6 w7 w30"
        for ttft, tpot in ((0.9, 0.9), (0.3, 0.6)):
            np.testing.assert_allclose(
                np.concatenate(remote.tlm.decide(query, ttft, tpot)),
                np.concatenate(local.tlm.decide(query, ttft, tpot)),
                rtol=0,
                atol=1e-5,
            )
        context = " ".join(f"w{i}" for i in range(9, 40))
        for slo, strategy in ((SLO(0.6, 0.9), "elastilm"), (SLO(1.0, 1.0), "full"), (SLO(0.5, 0.8), "layer-drop")):
            request = Request(query, context, False, slo, 5, strategy)
            a, b = local.answer(request), remote.answer(request)
            assert (a.plan.level, a.plan.ratio, a.plan.dropped) == (b.plan.level, b.plan.ratio, b.plan.dropped)
            assert a.compressed.ids == b.compressed.ids and a.text == b.text
        server.terminate()  # the device goes away between requests, with both models loaded ...
        server = start_server(port=9600)  # ... and comes back empty: the next request reconnects and reloads both
        assert server.port == int(endpoint.split(":")[1])
        request = Request(query, context, False, SLO(0.6, 0.9), 5)
        b = remote.answer(request)
        a = local.answer(request)
        assert (a.plan.level, a.plan.ratio, a.compressed.ids, a.text) == (
            b.plan.level,
            b.plan.ratio,
            b.compressed.ids,
            b.text,
        )
        assert remote.engine.session.connections == 2
        remote.close()  # the RPC server serves one session at a time

        process, url = spawn(out, tmp_path / "serve.log", bundle=bundle, rpc=endpoint)
        try:
            body = {
                "prompt": query,
                "context": " ".join(f"w{i}" for i in range(9, 40)),
                "max_tokens": 5,
                "slo": {"ttft": 0.6, "tpot": 0.9},
            }
            got = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
            local.cost = TLMCost(**httpx.get(f"{url}/health", timeout=30).json()["tlm_cost_ms"])  # the service's own
            expected = local.answer(request)
            assert got["choices"][0]["text"] == expected.text
            assert (got["elastilm"]["level"], got["elastilm"]["prompt_ratio"]) == (
                expected.plan.level,
                expected.plan.ratio,
            )
        finally:
            process.terminate()
            process.wait(30)
        assert "rpc 127.0.0.1" in (tmp_path / "serve.log").read_text()
    finally:
        server.terminate()
        local.close()


@pytest.fixture
def cache_functions(device_cache, tmp_path, monkeypatch):
    """The device server's cache functions in this process, with the session folder an RPC server gives them
    (`tvm.rpc.server.workpath`, registered by TVM's server in its own process)."""
    import tvm

    session = tmp_path / "session"
    session.mkdir()
    tvm.register_global_func("tvm.rpc.server.workpath", lambda name: str(session / name), override=True)
    device.register()
    functions = {n: tvm.get_global_func(f"elastilm.device.{n}") for n in ("has", "commit", "path")}
    return functions, session


def _upload(session, data: bytes) -> str:
    import hashlib

    (session / "incoming").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


KEY_A, KEY_B, KEY_C = "a" * 32, "b" * 32, "c" * 32


def test_the_cache_confines_keys_names_and_uploads(cache_functions, tmp_path):
    functions, session = cache_functions
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    digest = _upload(session, b"weights")
    for key, relpath in [
        ("../" + "a" * 29, "x"),
        (KEY_A, "../../victim.txt"),
        (KEY_A, ".stamps.json"),
        ("A" * 32, "x"),
    ]:
        with pytest.raises(Exception, match="not a build key|outside its build's cache"):
            functions["commit"]("incoming", key, relpath, digest)
    with pytest.raises(Exception, match="not an upload of this session"):
        functions["commit"](str(victim), KEY_A, "params/x.bin", "0" * 64)  # its digest mismatch would delete it
    assert victim.read_text() == "keep me"
    assert functions["commit"]("incoming", KEY_A, "params/x.bin", digest).endswith(f"{KEY_A}/params/x.bin")


def test_a_cached_file_changed_on_the_device_is_caught_and_uploaded_again(cache_functions):
    functions, session = cache_functions
    digest = _upload(session, b"0123456789")
    cached = functions["commit"]("incoming", KEY_A, "params/w.bin", digest)
    assert functions["has"](KEY_A, "params/w.bin", 10, digest)
    with open(cached, "r+b") as f:  # the same size, other bytes: a size check alone would miss it
        f.write(b"X")
    assert not functions["has"](KEY_A, "params/w.bin", 10, digest)
    assert not Path(cached).exists()


def test_the_cache_keeps_to_its_quota_dropping_the_least_recently_used_build(cache_functions, monkeypatch):
    functions, session = cache_functions
    monkeypatch.setenv(device.QUOTA_ENV, str(2500))
    digests = {}
    for key in (KEY_A, KEY_B):
        digests[key] = _upload(session, key.encode() * 32)  # 1 KiB each
        functions["commit"]("incoming", key, "params/w.bin", digests[key])
        time.sleep(0.05)
    assert functions["has"](KEY_A, "params/w.bin", 1024, digests[KEY_A])  # A used after B
    time.sleep(0.05)
    digests[KEY_C] = _upload(session, KEY_C.encode() * 32)
    functions["commit"]("incoming", KEY_C, "params/w.bin", digests[KEY_C])  # over the quota: B goes
    root = device.cache_root()
    assert (root / KEY_A).is_dir() and (root / KEY_C).is_dir() and not (root / KEY_B).exists()


def test_the_device_server_serves_on_after_a_session_crashes(built, local, device_cache):
    """A session's process killed on the device (as an out-of-memory kill would): the next client is served."""
    import psutil

    server = start_server(port=9700)
    try:
        endpoint = f"127.0.0.1:{server.port}"
        first = ElasticEngine(built, rpc=endpoint)
        sessions = psutil.Process(server.proc._proc.pid).children()
        assert len(sessions) == 1
        sessions[0].kill()
        sessions[0].wait(10)
        with pytest.raises(ElastiLMError):  # the crashed session's client gets a clear error
            first.prefill(prompt(local, 4, 1), 1.0)
        ids, got = prompt(local, 5, 3), []

        def second_client():  # hung for ever before: the accept loop had died with the session
            second = ElasticEngine(built, rpc=endpoint)
            got.append(greedy(second, ids, 0.5, n=4))
            second.close()

        thread = threading.Thread(target=second_client, daemon=True)
        thread.start()
        thread.join(120)
        assert got == [greedy(local, ids, 0.5, n=4)], "the second client was not served"
    finally:
        server.terminate()
