"""Answer a request under its latency objective: plan with the TLM, compress, run the chosen level, measure.

    Request (context parts, query, SLO, strategy)
      -> tokens counted, context window checked, the SLO as millisecond budgets (once)
      -> TLM decision head over the query + the budgets -> planner.choose (latency.json, the TLM's measured cost)
      -> compress the context to the plan's ratio (TLM score head; the query stays whole)
      -> generate at the plan's level -> predicted vs measured TTFT/TPOT, and whether the SLO was met

Everything here runs without torch: the LLM and the TLM are the TVM builds in one build folder, run where the
engine runs (this process or a device over RPC).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import planner
from elastilm.runtime_py.choice import option_scores
from elastilm.runtime_py.compress import Compressed, Part, Recency, compress
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.runtime_py.sampling import GREEDY, Sampling
from elastilm.runtime_py.session import DeviceLost
from elastilm.runtime_py.tlm import CompiledTLM


class InvalidRequest(ElastiLMError):
    """The request itself is wrong (too long for the context window, an unknown strategy): nothing ran."""


@dataclass
class Request:
    """One request: the user's query after an optional context (system text, few-shot examples: the part that may
    be compressed), its SLO and how to answer it."""

    query: str
    context: str = ""
    chat: bool = True  # in the model's chat template (False: context and query as plain text)
    slo: planner.SLO = planner.SLO(1.0, 1.0)  # no objective given: the full model's own latency
    max_new_tokens: int = 64
    strategy: str = "elastilm"  # a plan policy of planner.STRATEGIES
    options: list[str] | None = None  # multiple choice: score these continuations after the answer
    calibration: str | None = None  # ... minus their scores after this content-free question
    sampling: Sampling = GREEDY  # temperature, top_p, seed, penalties, stop sequences


@dataclass
class Answer:
    text: str
    plan: planner.Plan
    compressed: Compressed
    budgets: planner.Budgets
    ttft_ms: float = 0.0  # measured: from the request to the first token, TLM included
    tpot_ms: float = 0.0  # measured: mean time per token after the first
    tokens: int = 0
    finish_reason: str = "length"  # "stop": end-of-sequence or a stop sequence; "length": max_new_tokens reached
    choice: int | None = None  # multiple-choice requests: the best option
    option_scores: list[float] | None = None
    scale: tuple[float, float] = (1.0, 1.0)  # the calibration's plan_scale the plan was made with

    @property
    def ttft_budget_ms(self) -> float:
        return self.budgets.ttft_ms

    @property
    def tpot_budget_ms(self) -> float:
        return self.budgets.tpot_ms

    @property
    def slo_met(self) -> bool:
        return self.ttft_ms <= self.ttft_budget_ms and (self.tokens < 2 or self.tpot_ms <= self.tpot_budget_ms)

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "prompt_tokens": {
                "original": self.compressed.original,
                "requested": self.compressed.requested,
                "achieved": self.compressed.achieved,
            },
            "budget_ms": {"ttft": round(self.ttft_budget_ms, 1), "tpot": round(self.tpot_budget_ms, 1)},
            "measured_ms": {"ttft": round(self.ttft_ms, 1), "tpot": round(self.tpot_ms, 1)},
            "plan_scale": [round(x, 4) for x in self.scale],
            "tokens": self.tokens,
            "slo_met": self.slo_met,
            **(
                {"choice": self.choice, "option_scores": [round(x, 4) for x in self.option_scores]}
                if self.choice is not None
                else {}
            ),
        }


class Orchestrator:
    """One build folder (LLM, TLM, latency.json) serving requests with SLOs: in this process, or with an RPC
    engine on a device, where the TLM runs too (then `latency` should be a profile measured over that link)."""

    def __init__(
        self,
        build: str | Path,
        engine: ElasticEngine | None = None,
        calibrate: bool = True,
        latency: Path | None = None,
    ):
        build = Path(build)
        self.engine = engine or ElasticEngine(build)
        self.tlm = CompiledTLM(build / "tlm", self.engine.session)
        self.latency = planner.LatencyModel.from_file(latency or build / "latency.json")
        missing = [lv for lv in self.tlm.levels if lv not in self.engine.levels]
        if missing:
            raise ElastiLMError(f"{build}: the TLM plans levels {missing} that the model does not have; retrain it")
        self.cost = self.tlm.measure_cost()
        self.parts("warm up", "a context")  # compiles the chat template (18 ms here), which no request should pay
        # what this process measures against the profile (planner.Calibration); calibrate=False keeps the profile
        self.calibration = planner.Calibration()
        self.calibrate = calibrate

    def parts(self, query: str, context: str = "", chat: bool = True) -> list[Part]:
        """The prompt as parts: the context (system text, few-shot examples) compressible, the rest whole."""
        if not chat:
            return [Part(context), Part(query, compress=False)] if context else [Part(query, compress=False)]
        marker = "\x00CONTEXT\x00"
        text = self.engine.chat_prompt(query, system=marker if context else None)
        if not context:
            return [Part(text, compress=False)]
        if marker not in text:  # a template without a system turn (or none): the context goes first
            return [Part(context), Part(text, compress=False)]
        before, after = text.split(marker)
        return [Part(before, compress=False), Part(context), Part(after, compress=False)]

    def plan(self, request: Request, parts: list[Part]) -> tuple[planner.Plan, planner.Budgets]:
        """The plan for `request` (its prompt as `parts`) under its SLO, the TLM's or a baseline's
        (planner.STRATEGIES), and the SLO's budgets."""
        if request.strategy not in planner.STRATEGIES:
            raise InvalidRequest(f"unknown strategy '{request.strategy}'; known: {', '.join(planner.STRATEGIES)}")
        if request.options is not None and not all(o.strip() for o in request.options):
            raise InvalidRequest("every option must hold text")
        counts = [len(self.engine.encode(p.text)) for p in parts]
        prompt = sum(counts)
        if prompt + request.max_new_tokens > self.engine.max_len:
            raise InvalidRequest(
                f"prompt of {prompt} tokens + max_tokens {request.max_new_tokens} exceeds the context "
                f"window of {self.engine.max_len}"
            )
        if request.options:  # each option is scored after the whole prompt (and the calibration prompt's)
            longest = max(len(self.engine.encode(o)) for o in request.options)
            null = len(self.engine.encode(request.calibration)) if request.calibration is not None else 0
            if prompt + null + longest > self.engine.max_len:
                raise InvalidRequest(
                    f"prompt of {prompt} tokens + the longest option's {longest} exceed the context window of "
                    f"{self.engine.max_len}"
                )
        fixed = sum(n for p, n in zip(parts, counts) if not p.compress)
        budgets = planner.budgets(request.slo, self.latency, prompt, self.calibration.served, request.max_new_tokens)
        ratios = self.tlm.ratios if any(p.compress and p.text.strip() for p in parts) else (1.0,)
        preference = None
        if planner.STRATEGIES[request.strategy].decides:
            query = " ".join(p.text for p in parts if not p.compress)
            ratio_lp, level_lp = self.tlm.decide(query, budgets.ttft, budgets.tpot)
            preference = planner.Preference.from_heads(self.tlm.ratios, ratio_lp, self.tlm.levels, level_lp)
        plan_request = planner.PlanRequest(
            prompt,
            fixed,
            budgets,
            tuple(ratios),
            tuple(self.tlm.levels),
            self.cost,
            preference,
            self.calibration.plan_scale,
            request.max_new_tokens,
        )
        return planner.choose(request.strategy, plan_request, self.latency), budgets

    def answer(self, request: Request, stream: bool = False, cancelled=None):
        """Plan, compress, generate. With stream=True, yields text pieces and finally the Answer; else the Answer.
        `cancelled` (a threading.Event, the service's): once set, generation stops within one prefill chunk or
        one token, and nothing more is computed.
        With `request.options` (multiple choice), the Answer also carries the best option by per-character
        log-likelihood after the compressed prompt at the planned level, minus its score after the compressed
        context and `request.calibration` (a content-free question) when given; scoring comes after the timed
        generation."""
        run = self._answer(request, cancelled)
        if stream:
            return run
        text, answer = [], None
        for piece in run:
            if isinstance(piece, Answer):
                answer = piece
            else:
                text.append(piece)
        answer.text = "".join(text)
        return answer

    def _answer(self, request: Request, cancelled=None) -> Iterator:
        start = time.perf_counter()
        scale = self.calibration.plan_scale
        parts = self.parts(request.query, request.context, request.chat)
        try:
            p, budgets = self.plan(request, parts)
            c = self.compress(parts, p.ratio, request.strategy, request.query)
        except DeviceLost:  # the device went away between requests: nothing ran yet, so reconnect and plan again
            self.engine.session.connect()
            p, budgets = self.plan(request, parts)
            c = self.compress(parts, p.ratio, request.strategy, request.query)
        answer = Answer("", p, c, budgets, scale=scale)
        times: list[float] = []

        def timed(tokens):
            for t in tokens:
                times.append(time.perf_counter())
                yield t

        engine = self.model(p, request.strategy)
        tokens = timed(engine.generate_ids(c.ids, p.level, request.max_new_tokens, request.sampling, cancelled))
        answer.finish_reason = yield from engine.stream_text(tokens, request.sampling.stop)
        if cancelled is not None and cancelled.is_set():
            return
        answer.tokens = len(times)
        if times:
            answer.ttft_ms = 1000 * (times[0] - start)
            answer.tpot_ms = 1000 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
            if self.calibrate:  # against the profile's own predictions, unscaled
                self.calibration.add(0, answer.ttft_ms, p.ttft_ms / scale[0])
                if len(times) > 1:
                    self.calibration.add(1, answer.tpot_ms, p.tpot_ms / scale[1])
        if request.options:
            answer.option_scores = self.score_options(request, parts, c, p)
            answer.choice = int(np.argmax(answer.option_scores))
        yield answer

    def compress(self, parts: list[Part], ratio: float, strategy: str, question: str = "") -> Compressed:
        """`parts` compressed to `ratio` by the TLM's scores (by position for the score head's ablation), the
        context sentences that share words with `question` (the user's query) first."""
        scorer = self.tlm if planner.STRATEGIES[strategy].scores else Recency()
        return compress(parts, ratio, scorer, self.engine.tokenizer, question=question)

    def model(self, plan: planner.Plan, strategy: str) -> ElasticEngine:
        """The engine that runs `plan`: a layer-drop variant for the layer-dropping baseline, the levels without
        adapters for their ablation, otherwise the engine itself."""
        engine = self.engine.dropped(plan.dropped)
        return engine if planner.STRATEGIES[strategy].adapters else engine.without_adapters()

    def score_options(self, request: Request, parts: list[Part], c: Compressed, plan: planner.Plan) -> list[float]:
        """The options' scores after the compressed prompt `c` with the model of `plan` (the answer of a
        multiple-choice request; evaluate/outcomes.py asks it at plans the service did not run)."""
        engine, level = self.model(plan, request.strategy), plan.level
        ids = [engine.encode(o) for o in request.options]
        chars = [len(o) for o in request.options]
        scores = option_scores(engine, 0, c.ids, ids, level, chars)
        if request.calibration is None:
            return scores
        query = 0 if parts[-1].compress else len(self.engine.encode(parts[-1].text))
        context = c.ids[: len(c.ids) - query]  # the compressed prompt without its last part, the query
        null = option_scores(engine, 0, context + engine.encode(request.calibration), ids, level, chars)
        return [s - b for s, b in zip(scores, null)]

    def close(self) -> None:
        self.tlm.close()
        self.engine.close()


def describe(a: Answer) -> str:
    p = a.plan
    model = f"{p.dropped} layers dropped" if p.dropped else f"level {p.level:.0%}"
    return (
        f"plan: {model}, prompt ratio {p.ratio:g} ({a.compressed.original} -> {a.compressed.achieved} tokens, "
        f"requested {a.compressed.requested}); chosen by {p.chosen_by}\n"
        f"TTFT predicted {p.ttft_ms:.0f} ms (TLM {p.tlm_ms:.0f} ms), measured {a.ttft_ms:.0f} ms, budget {a.ttft_budget_ms:.0f} ms\n"
        f"TPOT predicted {p.tpot_ms:.1f} ms, measured {a.tpot_ms:.1f} ms, budget {a.tpot_budget_ms:.1f} ms\n"
        f"SLO {'met' if a.slo_met else 'missed'}"
        + ("" if p.feasible else " (no plan was predicted to meet it; ran the fastest)")
    )
