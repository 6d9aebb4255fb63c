"""`elastilm serve`: an OpenAI-compatible HTTP service over one elastic model, with a latency objective per request.

    POST /v1/chat/completions, /v1/completions   OpenAI request bodies (stream or not) plus extension fields:
                                                 "slo": {"ttft_ms": 300, "tpot_ms": 60} or {"ttft": 0.4, "tpot": 0.8}
                                                 (fractions of the full model on this device); "strategy" (a
                                                 baseline plan policy, for comparisons); on completions "context"
                                                 (compressible text before the prompt) and "options" (+
                                                 "calibration"): multiple choice by likelihood. Every response
                                                 carries "elastilm": the plan (level, prompt ratio), predicted vs
                                                 measured TTFT/TPOT, whether the SLO was met (and the choice)
    GET  /v1/models, /health, /metrics (Prometheus text)

One model, one KV cache, so one request runs at a time on a worker thread. Requests wait in a fair queue: one FIFO
per app (the "user" field, else the API key, else the client address), served round-robin, so an app that sends
many requests cannot starve the others, and `max_tokens` is capped so no request holds the model long. Tokens go
to the client through a buffer, so a slow reader never stalls the model; a client that disconnects is cancelled
at its next token (or dropped from the queue) and frees its place. A full queue answers 429 with Retry-After.
Bad requests get a 400 with the reason (OpenAI's error shape); the server itself never stops on one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from elastilm import ElastiLMError
from elastilm.runtime import planner
from elastilm.runtime.compress import Part
from elastilm.runtime.orchestrator import Answer

DEFAULT_SLO = planner.SLO(1.0, 1.0)  # no objective given: the full model's own latency


class SLOField(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    ttft: float | None = Field(None, gt=0, description="fraction of the full model's TTFT")
    tpot: float | None = Field(None, gt=0, description="fraction of the full model's TPOT")

    @model_validator(mode="after")
    def _one_kind(self):
        ms, frac = (self.ttft_ms, self.tpot_ms), (self.ttft, self.tpot)
        if all(v is not None for v in ms) and all(v is None for v in frac):
            return self
        if all(v is not None for v in frac) and all(v is None for v in ms):
            return self
        raise ValueError("give either ttft_ms and tpot_ms (milliseconds) or ttft and tpot (fractions of the full model)")

    def to_slo(self) -> planner.SLO:
        if self.ttft_ms is not None:
            return planner.SLO(self.ttft_ms, self.tpot_ms, relative=False)
        return planner.SLO(self.ttft, self.tpot)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class _Common(BaseModel):
    model: str | None = None
    strategy: str = "elastilm"  # elastilm extension: a baseline plan policy instead (runtime.planner.STRATEGIES)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    user: str | None = None
    slo: SLOField | None = None
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str
    context: str = ""  # elastilm extension: text before the prompt that may be compressed
    options: list[str] | None = Field(None, min_length=2)  # extension: multiple choice, answered by likelihood
    calibration: str | None = None  # extension: a content-free prompt whose option scores are subtracted


@dataclass
class Job:
    app: str
    parts: list[Part]
    slo: planner.SLO
    max_tokens: int
    sampling: dict
    loop: asyncio.AbstractEventLoop
    extra: dict = field(default_factory=dict)  # strategy, options, calibration
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # text pieces, then the Answer or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class FairQueue:
    """Per-app FIFOs served round-robin; bounded in total."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._apps: OrderedDict[str, deque] = OrderedDict()
        self._cond = threading.Condition()
        self._size = 0
        self._closed = False

    def __len__(self) -> int:
        return self._size

    def put(self, job) -> bool:
        """False when full."""
        with self._cond:
            if self._size >= self.capacity:
                return False
            self._apps.setdefault(job.app, deque()).append(job)
            self._size += 1
            self._cond.notify()
            return True

    def get(self, timeout: float | None = None):
        """The next job: the head of the app served longest ago (None on timeout or close)."""
        with self._cond:
            while not self._size and not self._closed:
                if not self._cond.wait(timeout):
                    return None
            if self._closed:
                return None
            app, jobs = next(iter(self._apps.items()))
            job = jobs.popleft()
            self._size -= 1
            del self._apps[app]
            if jobs:
                self._apps[app] = jobs  # to the back of the round
            return job

    def remove(self, job) -> bool:
        with self._cond:
            jobs = self._apps.get(job.app)
            if jobs is None or job not in jobs:
                return False
            jobs.remove(job)
            self._size -= 1
            if not jobs:
                del self._apps[job.app]
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("elastilm_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=self.registry)
        self.slo = Counter("elastilm_slo", "Finished requests by whether their SLO was met", ["met"], registry=self.registry)
        self.tokens = Counter("elastilm_generated_tokens", "Tokens generated", registry=self.registry)
        self.queue = Gauge("elastilm_queue_depth", "Requests waiting", registry=self.registry)
        self.ttft = Histogram("elastilm_ttft_seconds", "Measured time to first token", registry=self.registry,
                              buckets=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4))
        self.level = Counter("elastilm_plans", "Plans by level and prompt ratio", ["level", "ratio"], registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """The worker and the queue around one Orchestrator."""

    def __init__(self, orchestrator, model_id: str, queue: int = 16, max_tokens: int = 256, api_key: str | None = None, strict: bool = True):
        self.orch = orchestrator
        self.model_id = model_id
        self.queue = FairQueue(queue)
        self.max_tokens = max_tokens
        self.api_key = api_key
        self.strict = strict
        self.metrics = Metrics()
        self.mean_seconds = 1.0  # running mean service time, for Retry-After
        self.busy = False
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name="elastilm-worker", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self.queue.close()
        self._worker.join(timeout=30)

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.metrics.queue.set(len(self.queue))
            if job.cancelled.is_set():
                continue
            self.busy = True
            start = time.perf_counter()
            try:
                run = self.orch.answer(job.parts, job.slo, job.max_tokens, stream=True, **job.extra, **job.sampling)
                for item in run:
                    if job.cancelled.is_set():
                        run.close()  # the client left: stop generating, free the model
                        break
                    job.put(item)
            except Exception as e:  # noqa: BLE001  (one request's failure is reported to it, the worker goes on)
                job.put(e if isinstance(e, ElastiLMError) else ElastiLMError(f"{type(e).__name__}: {e}"))
            finally:
                self.busy = False
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - start)

    def retry_after(self) -> int:
        return max(1, round((len(self.queue) + 1) * self.mean_seconds))

    def submit(self, job: Job) -> bool:
        ok = self.queue.put(job)
        self.metrics.queue.set(len(self.queue))
        return ok

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        self.queue.remove(job)
        self.metrics.queue.set(len(self.queue))

    def next_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def _report(answer: Answer) -> dict:
    d = answer.to_dict()
    plan = d.pop("plan")
    return {"level": plan["level"], "layers_dropped": plan["dropped"], "prompt_ratio": plan["ratio"], "chosen_by": plan["chosen_by"], "feasible": plan["feasible"],
            "predicted_ms": {"ttft": plan["ttft_ms"], "tpot": plan["tpot_ms"], "tlm": plan["tlm_ms"]}, **d}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="ElastiLM", docs_url=None, redoc_url=None)
    orch = service.orch

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        service.metrics.requests.labels(request.url.path, "400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}")

    def _unauthorized(request: Request) -> JSONResponse | None:
        """401 unless the request carries the API key (a check per endpoint, not a middleware: Starlette's
        middleware hides client disconnects from the endpoint)."""
        if service.api_key and request.headers.get("authorization", "") != f"Bearer {service.api_key}":
            service.metrics.requests.labels(request.url.path, "401").inc()
            return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return None

    async def _body(request: Request, schema):
        try:
            raw = json.loads(await request.body() or b"null")
        except json.JSONDecodeError as e:
            raise ElastiLMError(f"malformed JSON: {e}")
        if not isinstance(raw, dict):
            raise ElastiLMError("the request body must be a JSON object")
        if service.strict:
            unknown = sorted(set(raw) - set(schema.model_fields))
            if unknown:
                raise ElastiLMError(f"unknown field(s) {unknown}; this server is strict (start it with --lenient to ignore them)")
        return schema.model_validate(raw)

    def _app_name(request: Request, body) -> str:
        return body.user or request.headers.get("authorization") or (request.client.host if request.client else "anonymous")

    async def _handle(request: Request, schema, kind: str):
        endpoint = request.url.path
        if (denied := _unauthorized(request)) is not None:
            return denied
        try:
            body = await _body(request, schema)
            if body.model not in (None, service.model_id):
                raise ElastiLMError(f"unknown model '{body.model}'; this server serves '{service.model_id}' (GET /v1/models)")
            if isinstance(body, ChatRequest):
                system = "\n".join(m.content for m in body.messages if m.role in ("system", "developer"))
                turns = [m for m in body.messages if m.role in ("user", "assistant")]
                if not turns or turns[-1].role != "user":
                    raise ElastiLMError("the last message must be from the user")
                query = "\n".join(m.content for m in turns)
                parts = orch.parts(query, system)
            else:
                parts = orch.parts(body.prompt, body.context, chat=False)
            max_tokens = min(body.max_tokens or service.max_tokens, service.max_tokens)
            prompt_tokens = sum(len(orch.engine.encode(p.text)) for p in parts)
            if prompt_tokens + max_tokens > orch.engine.max_len:
                raise ElastiLMError(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the context window of {orch.engine.max_len}")
            slo = body.slo.to_slo() if body.slo else DEFAULT_SLO
            if body.strategy not in planner.STRATEGIES:
                raise ElastiLMError(f"unknown strategy '{body.strategy}'; known: {', '.join(planner.STRATEGIES)}")
            extra = {"strategy": body.strategy}
            if isinstance(body, CompletionRequest) and body.options:
                extra.update(options=body.options, calibration=body.calibration)
        except (ElastiLMError, ValueError) as e:
            service.metrics.requests.labels(endpoint, "400").inc()
            return _error(400, str(e))
        sampling = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed or 0}
        job = Job(_app_name(request, body), parts, slo, max_tokens, sampling, asyncio.get_running_loop(), extra)
        if not service.submit(job):
            service.metrics.requests.labels(endpoint, "429").inc()
            return _error(429, f"the queue is full ({service.queue.capacity} waiting); retry later", "rate_limit_error",
                          {"Retry-After": str(service.retry_after())})
        rid = service.next_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            return StreamingResponse(_stream(request, job, rid, kind, endpoint), media_type="text/event-stream")
        return await _whole(request, job, rid, kind, endpoint)

    async def _next(request: Request, job: Job):
        """The next item from the worker, or None once the client has gone (the job is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(job.out.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    service.cancel(job)
                    return None

    def _finish(answer: Answer, endpoint: str) -> None:
        m = service.metrics
        m.requests.labels(endpoint, "200").inc()
        m.slo.labels(str(answer.slo_met).lower()).inc()
        m.tokens.inc(answer.tokens)
        m.ttft.observe(answer.ttft_ms / 1000)
        m.level.labels(f"{answer.plan.level:g}", f"{answer.plan.ratio:g}").inc()

    def _choice(kind: str, text: str, finish: str | None, delta: bool) -> dict:
        if kind == "chat":
            body = {"delta": {"content": text}} if delta else {"message": {"role": "assistant", "content": text}}
        else:
            body = {"text": text}
        return {"index": 0, **body, "finish_reason": finish}

    def _usage(answer: Answer) -> dict:
        return {"prompt_tokens": answer.compressed.achieved, "completion_tokens": answer.tokens,
                "total_tokens": answer.compressed.achieved + answer.tokens}

    def _finish_reason(answer: Answer, max_tokens: int) -> str:
        return "length" if answer.tokens >= max_tokens else "stop"

    async def _whole(request: Request, job: Job, rid: str, kind: str, endpoint: str):
        pieces = []
        while True:
            item = await _next(request, job)
            if item is None:
                return _error(499, "client closed the request")
            if isinstance(item, Exception):
                service.metrics.requests.labels(endpoint, "500").inc()
                return _error(500, str(item), "server_error")
            if isinstance(item, Answer):
                break
            pieces.append(item)
        _finish(item, endpoint)
        return {
            "id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": service.model_id, "choices": [_choice(kind, "".join(pieces), _finish_reason(item, job.max_tokens), False)],
            "usage": _usage(item), "elastilm": _report(item),
        }

    async def _stream(request: Request, job: Job, rid: str, kind: str, endpoint: str):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": service.model_id}
        try:
            while True:
                item = await _next(request, job)
                if item is None:
                    return
                if isinstance(item, Exception):
                    service.metrics.requests.labels(endpoint, "500").inc()
                    yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error', 'code': 500}})}\n\n"
                    return
                if isinstance(item, Answer):
                    _finish(item, endpoint)
                    last = {**head, "choices": [_choice(kind, "", _finish_reason(item, job.max_tokens), True)],
                            "usage": _usage(item), "elastilm": _report(item)}
                    yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield f"data: {json.dumps({**head, 'choices': [_choice(kind, item, None, True)]})}\n\n"
        finally:  # also when the client went away mid-stream (the server closes this generator): stop the job
            service.cancel(job)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _handle(request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, CompletionRequest, "text")

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := _unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "owned_by": "elastilm",
                                            "levels": list(orch.tlm.levels), "prompt_ratios": list(orch.tlm.ratios),
                                            "context_window": orch.engine.max_len}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id, "queued": len(service.queue), "busy": service.busy,
                "calibration": orch.calibration.to_dict()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.text(), media_type="text/plain; version=0.0.4")

    return app


def spawn(build, log_path, **options) -> tuple["subprocess.Popen", str]:
    """`elastilm serve` in a subprocess on a free loopback port, once it answers /health: (process, base URL)."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if v is not None]
    process = subprocess.Popen([sys.executable, "-m", "elastilm", "serve", "--build", str(build), "--port", str(port), *flags],
                               stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
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


def serve(orch, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the service on an Orchestrator until interrupted (uvicorn)."""
    import uvicorn

    service = Service(orch, orch.engine.manifest["model"], **options)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="info")
    finally:
        service.close()
        orch.close()
