"""The HTTP API's request and response bodies: OpenAI's chat/completions shapes plus ElastiLM's extension fields.

Extension fields of a request: "slo": {"ttft_ms": 300, "tpot_ms": 60} (milliseconds) or {"ttft": 0.4, "tpot":
0.8} (fractions of the full model on this device); "strategy" (a baseline plan policy, for comparisons); on
completions "context" (compressible text before the prompt) and "options" (+ "calibration"): multiple choice by
likelihood. Every response carries "elastilm" (`report`): the plan (level, prompt ratio), predicted vs measured
TTFT/TPOT, whether the SLO was met (and the choice).
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from elastilm.runtime_py.orchestrator import Answer, Request
from elastilm.runtime_py.planner import SLO
from elastilm.runtime_py.sampling import MAX_STOP, Sampling

MAX_OPTIONS = 16  # choices of a multiple-choice completion


class SLOField(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
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
        raise ValueError(
            "give either ttft_ms and tpot_ms (milliseconds) or ttft and tpot (fractions of the full model)"
        )

    def to_slo(self) -> SLO:
        if self.ttft_ms is not None:
            return SLO(self.ttft_ms, self.tpot_ms, relative=False)
        return SLO(self.ttft, self.tpot)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class _Common(BaseModel):
    # strict: "5" is not a number and 1 is not a boolean (pydantic would coerce both); an int is still a float
    model_config = ConfigDict(strict=True)
    model: str | None = None
    strategy: str = "elastilm"  # elastilm extension: a baseline plan policy instead (runtime_py.planner.STRATEGIES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens in OpenAI's chat API
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # extension, as in transformers and llama.cpp; 1 = off
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} sequences; the text ends before one")
    stream: bool = False
    stream_options: dict | None = None  # accepted; the last streamed chunk always carries the usage
    user: str | None = None
    slo: SLOField | None = None
    n: int = Field(1, ge=1, le=1)

    def max_new_tokens(self, cap: int) -> int:
        """The answer's token limit: the request's (either name), at most the server's `cap`."""
        return min(self.max_completion_tokens or self.max_tokens or cap, cap)

    def _slo(self) -> SLO:
        """The request's SLO; none given: the full model's own latency."""
        return self.slo.to_slo() if self.slo else SLO(1.0, 1.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        return stop

    def characters(self) -> int:
        """Characters of all text the request would have tokenized."""
        raise NotImplementedError

    def sampling(self) -> Sampling:
        return Sampling(
            self.temperature,
            self.top_p,
            self.seed or 0,
            self.frequency_penalty,
            self.presence_penalty,
            self.repetition_penalty,
            tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()),
        )


class ChatRequest(_Common):
    kind: ClassVar[str] = "chat"
    messages: list[Message] = Field(min_length=1)

    def characters(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def to_request(self, max_tokens: int) -> Request:
        """The orchestrator's Request: system and developer messages are the (compressible) context, the turns the query."""
        system = "\n".join(m.content for m in self.messages if m.role in ("system", "developer"))
        turns = [m for m in self.messages if m.role in ("user", "assistant")]
        if not turns or turns[-1].role != "user":
            raise ValueError("the last message must be from the user")
        return Request(
            "\n".join(m.content for m in turns),
            system,
            True,
            self._slo(),
            max_tokens,
            self.strategy,
            sampling=self.sampling(),
        )


class CompletionRequest(_Common):
    kind: ClassVar[str] = "text"
    prompt: str
    context: str = ""  # elastilm extension: text before the prompt that may be compressed
    # extension: multiple choice, answered by likelihood
    options: list[str] | None = Field(None, min_length=2, max_length=MAX_OPTIONS)
    calibration: str | None = None  # extension: a content-free prompt whose option scores are subtracted

    def characters(self) -> int:
        return len(self.prompt) + len(self.context) + sum(map(len, self.options or ())) + len(self.calibration or "")

    def to_request(self, max_tokens: int) -> Request:
        return Request(
            self.prompt,
            self.context,
            False,
            self._slo(),
            max_tokens,
            self.strategy,
            self.options or None,
            self.calibration if self.options else None,
            self.sampling(),
        )


def error(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def report(answer: Answer) -> dict:
    """The "elastilm" field of a response."""
    d = answer.to_dict()
    plan = d.pop("plan")
    return {
        "level": plan["level"],
        "layers_dropped": plan["dropped"],
        "prompt_ratio": plan["ratio"],
        "chosen_by": plan["chosen_by"],
        "feasible": plan["feasible"],
        "predicted_ms": {"ttft": plan["ttft_ms"], "tpot": plan["tpot_ms"], "tlm": plan["tlm_ms"]},
        **d,
    }


def choice(kind: str, text: str, finish: str | None, delta: bool) -> dict:
    if kind == "chat":
        body = {"delta": {"content": text}} if delta else {"message": {"role": "assistant", "content": text}}
    else:
        body = {"text": text}
    return {"index": 0, **body, "finish_reason": finish}


def usage(answer: Answer) -> dict:
    return {
        "prompt_tokens": answer.compressed.achieved,
        "completion_tokens": answer.tokens,
        "total_tokens": answer.compressed.achieved + answer.tokens,
    }


def completion(kind: str, rid: str, model: str, text: str, answer: Answer) -> dict:
    """A whole (not streamed) response."""
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice(kind, text, answer.finish_reason, False)],
        "usage": usage(answer),
        "elastilm": report(answer),
    }


def chunk_head(kind: str, rid: str, model: str) -> dict:
    """The fields every streamed chunk repeats."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
