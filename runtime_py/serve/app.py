"""The HTTP routes (FastAPI): OpenAI-compatible chat/completions with SLOs, models, health, metrics.

    POST /v1/chat/completions, /v1/completions   OpenAI bodies plus the extension fields (protocol.py)
    GET  /v1/models, /health, /metrics (Prometheus text)

A route parses the body (protocol.py), queues one Job (queue.py) and relays what the worker (worker.py) sends.
Bad requests get a 400 with the reason (OpenAI's error shape), a body over the limit 413 before it is parsed, a
full queue 429 with Retry-After, a failure inside the server 500 with an error id (the details go to the log,
never to the client); the server itself never stops on one. A client that disconnects is cancelled at its next
token (or dropped from the queue). With an API key (or the apps' keys), every route but a bare liveness answer on
/health needs one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.orchestrator import Answer, InvalidRequest
from elastilm.runtime_py.serve import protocol
from elastilm.runtime_py.serve.queue import Job
from elastilm.runtime_py.serve.worker import Service, Unavailable


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="ElastiLM", docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_exception_handler(RequestValidationError, _invalid)
    app.post("/v1/chat/completions")(chat)
    app.post("/v1/completions")(completions)
    app.get("/v1/models")(models)
    app.get("/health")(health)
    app.get("/metrics")(metrics)
    return app


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(protocol.error(status, message, kind), status_code=status, headers=headers)


def _service(request: Request) -> Service:
    return request.app.state.service


async def _invalid(request: Request, exc: RequestValidationError):
    _service(request).metrics.requests.labels(request.url.path, "400").inc()
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return _error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}")


def _caller(request: Request) -> str | None:
    """The app whose key the request carries (--app-keys); "" on a server without per-app keys, when the request
    carries its one key or the server needs none; None when the request lacks a key the server needs. Keys are
    compared in constant time, every one of them."""
    service = _service(request)
    given = request.headers.get("authorization", "").encode()
    if service.app_keys:
        found = None
        for app, key in service.app_keys.items():
            if hmac.compare_digest(given, f"Bearer {key}".encode()):
                found = app
        return found
    if service.api_key and not hmac.compare_digest(given, f"Bearer {service.api_key}".encode()):
        return None
    return ""


def _authorized(request: Request) -> bool:
    return _caller(request) is not None


def _unauthorized(request: Request) -> JSONResponse | None:
    """400 for a Host header the server does not answer to, 401 unless the request carries the API key (a check
    per endpoint, not a middleware: Starlette's middleware hides client disconnects from the endpoint)."""
    service = _service(request)
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    if service.hosts is not None and name not in service.hosts:
        service.metrics.requests.labels(request.url.path, "400").inc()
        return _error(400, f"this server answers to {', '.join(service.hosts)}, not Host: {host}")
    if not _authorized(request):
        service.metrics.requests.labels(request.url.path, "401").inc()
        return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
    return None


class TooLarge(ElastiLMError):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (TooLarge) as soon as it passes `limit` bytes: by its Content-Length before reading, or
    while it streams in."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"the request body is {int(length)} bytes; this server accepts at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is over {limit} bytes; this server accepts at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _body(request: Request, schema):
    service = _service(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ElastiLMError(f"the body must be JSON (Content-Type: application/json), got {kind or 'none'}")
    data = await _read_body(request, service.max_body)
    try:
        raw = json.loads(data or b"null", parse_constant=_no_constant)
    except RecursionError:
        raise ElastiLMError("the JSON body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError included
        raise ElastiLMError(f"malformed JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ElastiLMError("the request body must be a JSON object")
    if _service(request).strict:
        unknown = sorted(set(raw) - set(schema.model_fields))
        if unknown:
            raise ElastiLMError(
                f"unknown field(s) {unknown}; this server is strict (start it with --lenient to ignore them)"
            )
    body = schema.model_validate(raw)
    if (chars := body.characters()) > service.max_chars:
        raise ElastiLMError(
            f"the request holds {chars} characters of text; this server accepts at most {service.max_chars}"
        )
    return body


def _app_name(request: Request, body) -> str:
    """The app a request counts as in the queue: its key's app, else what the client says it is."""
    return _caller(request) or body.user or (request.client.host if request.client else "anonymous")


async def chat(request: Request):
    return await _handle(request, protocol.ChatRequest)


async def completions(request: Request):
    return await _handle(request, protocol.CompletionRequest)


async def _handle(request: Request, schema):
    service, endpoint = _service(request), request.url.path
    if (denied := _unauthorized(request)) is not None:
        return denied
    try:
        body = await _body(request, schema)
        if body.model not in (None, service.model_id):
            raise ElastiLMError(
                f"unknown model '{body.model}'; this server serves '{service.model_id}' (GET /v1/models)"
            )
        job = Job(
            _app_name(request, body),
            body.to_request(body.max_new_tokens(service.max_tokens)),
            asyncio.get_running_loop(),
        )
    except TooLarge as e:
        service.metrics.requests.labels(endpoint, "413").inc()
        return _error(413, str(e))
    except (ElastiLMError, ValueError) as e:
        service.metrics.requests.labels(endpoint, "400").inc()
        return _error(400, str(e))
    if (reason := service.problem()) is not None:
        service.metrics.requests.labels(endpoint, "503").inc()
        return _error(503, f"the service is unavailable ({reason}); retry later", "server_error")
    if (refused := service.submit(job)) is not None:
        service.metrics.requests.labels(endpoint, "429").inc()
        return _error(
            429,
            f"{refused}; retry later",
            "rate_limit_error",
            {"Retry-After": str(service.retry_after())},
        )
    rid = service.next_id("chatcmpl" if schema.kind == "chat" else "cmpl")
    first = await _next(request, job)
    if first is None:
        return _error(499, "client closed the request")
    if isinstance(first, Exception):
        service.cancel(job)
        status, kind = _failure(first)
        service.metrics.requests.labels(endpoint, str(status)).inc()
        return _error(status, str(first), kind)
    if body.stream:
        return StreamingResponse(_stream(request, job, first, rid, schema.kind), media_type="text/event-stream")
    return await _whole(request, job, first, rid, schema.kind)


def _failure(error: Exception) -> tuple[int, str]:
    """The status and error type a request's failure is answered with: the request's own fault 400, a service
    that cannot answer 503, anything else 500 (its message is the worker's error id)."""
    if isinstance(error, InvalidRequest):
        return 400, "invalid_request_error"
    return (503 if isinstance(error, Unavailable) else 500), "server_error"


async def _next(request: Request, job: Job):
    """The next item from the worker; None once the client has gone (the job is then cancelled); Unavailable when
    the worker can no longer answer it."""
    service = _service(request)
    while True:
        try:
            return await asyncio.wait_for(job.out.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                service.cancel(job)
                return None
            if (reason := service.problem()) is not None:
                service.cancel(job)
                return Unavailable(f"the service is unavailable ({reason}); retry later")


async def _whole(request: Request, job: Job, item, rid: str, kind: str):
    service, pieces = _service(request), []
    while not isinstance(item, Answer):
        if item is None:
            return _error(499, "client closed the request")
        if isinstance(item, Exception):
            status, kind = _failure(item)
            service.metrics.requests.labels(request.url.path, str(status)).inc()
            return _error(status, str(item), kind)
        pieces.append(item)
        item = await _next(request, job)
    service.metrics.answered(item, request.url.path)
    return protocol.completion(kind, rid, service.model_id, "".join(pieces), item)


async def _stream(request: Request, job: Job, item, rid: str, kind: str):
    service = _service(request)
    head = protocol.chunk_head(kind, rid, service.model_id)
    try:
        while item is not None:
            if isinstance(item, Exception):
                status, kind = _failure(item)
                service.metrics.requests.labels(request.url.path, str(status)).inc()
                yield f"data: {json.dumps(protocol.error(status, str(item), kind))}\n\n"
                return
            if isinstance(item, Answer):
                service.metrics.answered(item, request.url.path)
                last = {
                    **head,
                    "choices": [protocol.choice(kind, "", item.finish_reason, True)],
                    "usage": protocol.usage(item),
                    "elastilm": protocol.report(item),
                }
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield f"data: {json.dumps({**head, 'choices': [protocol.choice(kind, item, None, True)]})}\n\n"
            item = await _next(request, job)
    finally:  # also when the client went away mid-stream (the server closes this generator): stop the job
        service.cancel(job)


async def models(request: Request):
    if (denied := _unauthorized(request)) is not None:
        return denied
    service = _service(request)
    orch = service.orch
    return {
        "object": "list",
        "data": [
            {
                "id": service.model_id,
                "object": "model",
                "owned_by": "elastilm",
                "levels": list(orch.tlm.levels),
                "prompt_ratios": list(orch.tlm.ratios),
                "context_window": orch.engine.max_len,
            }
        ],
    }


async def health(request: Request):
    """Liveness; with an API key, only {"status": "ok"} unless the request carries it."""
    service = _service(request)
    if (reason := service.problem()) is not None:
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    if not _authorized(request):
        return {"status": "ok"}
    return {
        "status": "ok",
        "model": service.model_id,
        "queued": len(service.queue),
        "busy": service.busy,
        "calibration": service.orch.calibration.to_dict(),
        "tlm_cost_ms": dataclasses.asdict(service.orch.cost),
    }


async def metrics(request: Request):
    if (denied := _unauthorized(request)) is not None:
        return denied
    return PlainTextResponse(_service(request).metrics.text(), media_type="text/plain; version=0.0.4")
