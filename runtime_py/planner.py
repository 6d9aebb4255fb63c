"""Choose (prompt ratio, level) for a request under its latency objective (SLO: TTFT and TPOT budgets).

The SLO becomes millisecond budgets once per request (`budgets`); a `PlanRequest` carries them with everything
else a plan policy needs, and `choose` runs one named policy of the registry `STRATEGIES` (ElastiLM's and the
baselines it is compared with).

Predictions come from the build's `latency.json` (`elastilm profile`): TTFT per level at several prompt lengths
(linear in between and beyond), and TPOT per level after prompts of those lengths. A decoded token reads the
whole KV cache, so TPOT grows with the context: a plan's TPOT is predicted halfway through its answer (the
compressed prompt plus half of max_tokens), from a straight line per level fitted to the profile (the attention
term is linear in the context; the fit smooths the noise of 16-token medians). Measurements are noisy, and a
bigger level is never really faster, so each column is made monotone over levels (pool-adjacent-violators)
before use. The TLM's own time
counts inside TTFT: its decision over the query always when it plans, and scoring the compressible part when
the ratio is below 1.

A plan is the TLM decision head's choice when that meets the SLO; otherwise the feasible plan the head scores
best; if nothing meets the SLO, the fastest plan, marked infeasible. SLO budgets are milliseconds or fractions
of the full model's latency on this device for this prompt (TTFT at the uncompressed length, TPOT).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from elastilm.formats import latency as latency_file
from elastilm.formats.errors import ElastiLMError


@dataclass(frozen=True)
class SLO:
    ttft: float
    tpot: float
    relative: bool = True  # fractions of the full model's TTFT and TPOT; False: milliseconds

    def __post_init__(self):
        for name in ("ttft", "tpot"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ElastiLMError(f"SLO {name} must be a positive number, got {v!r}")


@dataclass(frozen=True)
class Plan:
    ratio: float
    level: float
    tokens: int  # LLM prompt tokens after compression
    ttft_ms: float  # predicted, TLM time included
    tpot_ms: float
    tlm_ms: float
    feasible: bool  # predicted to meet the SLO
    chosen_by: str  # "tlm", "best feasible", "fastest (SLO infeasible)" or a baseline's name
    dropped: int = 0  # layers skipped (the layer-dropping baseline; it runs at level 1.0)

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def named(self, how: str) -> Plan:
        return replace(self, chosen_by=how)


def _monotone(values: np.ndarray) -> np.ndarray:
    """The closest non-decreasing sequence (pool-adjacent-violators, equal weights)."""
    blocks: list[list[float]] = []
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (a, n), (b, m) = blocks[-2], blocks.pop()
            blocks[-1] = [(a * n + b * m) / (n + m), n + m]
    return np.concatenate([[v] * int(n) for v, n in blocks])


def _lines(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each row of `y` (over the lengths `x`) replaced by its least-squares line, never decreasing."""
    if len(x) < 2:
        return y.copy()
    slope, intercept = np.polyfit(x, y.T, 1)
    slope = np.maximum(slope, 0.0)
    intercept = np.where(slope > 0, intercept, y.mean(1))
    return intercept[:, None] + slope[:, None] * x[None, :]


class LatencyModel:
    """Predicted TTFT(level, prompt tokens) and TPOT(level, context tokens) in ms, from a latency profile."""

    def __init__(self, doc: dict):
        latency_file.check(doc)
        rows = sorted(doc["levels"], key=lambda r: r["fraction"])
        self.levels = [r["fraction"] for r in rows]
        self._rows = {f: i for i, f in enumerate(self.levels)}
        self.lengths = np.array(doc["prompt_lengths"], float)
        for r in rows + (doc.get("layer_drop") or []):
            if not all(len(r[k]) == len(self.lengths) for k in ("ttft_ms", "tpot_ms")):
                raise ElastiLMError(
                    f"latency profile: level {r['fraction']:g} has {len(r['ttft_ms'])} TTFT and {len(r['tpot_ms'])} "
                    f"TPOT times for {len(self.lengths)} prompt lengths; measure it again with `elastilm profile`"
                )
        ttft = np.array([r["ttft_ms"] for r in rows], float)
        self._ttft = np.stack([_monotone(ttft[:, j]) for j in range(ttft.shape[1])], 1)
        tpot = _lines(np.array([r["tpot_ms"] for r in rows], float), self.lengths)
        tpot = np.stack([_monotone(tpot[:, j]) for j in range(tpot.shape[1])], 1)
        self._tpot = np.maximum.accumulate(tpot, axis=1)
        self.device = doc.get("device", "")
        # the layer-dropping variants as a model of their own, over the share of layers kept (1.0: the full model)
        self.layer_drop: LatencyModel | None = None
        self.dropped: dict[float, int] = {}  # share of layers kept -> layers dropped
        drops = doc.get("layer_drop")
        if drops:
            self.layer_drop = LatencyModel({**doc, "levels": [rows[-1], *drops], "layer_drop": None})
            self.layer_drop.dropped = {1.0: 0, **{r["fraction"]: r["dropped"] for r in drops}}

    @classmethod
    def from_file(cls, path: Path) -> LatencyModel:
        return cls(latency_file.read(path))

    def _row(self, level: float) -> int:
        if level not in self._rows:
            raise ElastiLMError(
                f"level {level:g} is not in the latency profile ({', '.join(f'{f:g}' for f in self.levels)})"
            )
        return self._rows[level]

    def ttft(self, level: float, tokens: int) -> float:
        """Linear between profiled lengths and along the end segments beyond them; below the shortest length
        never less than proportional to tokens."""
        x, y = self.lengths, self._ttft[self._row(level)]
        if len(x) == 1:
            return float(y[0] * tokens / x[0])
        if tokens <= x[0]:
            return float(max(y[0] + (tokens - x[0]) * (y[1] - y[0]) / (x[1] - x[0]), y[0] * tokens / x[0]))
        return _onward(x, y, tokens)

    def tpot(self, level: float, context: float) -> float:
        """A token decoded after `context` tokens: linear between profiled lengths and along the last segment
        beyond them; below the shortest length the time there (the weights' share does not shrink)."""
        return _onward(self.lengths, self._tpot[self._row(level)], context)


def _onward(x: np.ndarray, y: np.ndarray, v: float) -> float:
    """y at v: linear between the points x, along the last segment beyond them, flat below the first."""
    if len(x) > 1 and v > x[-1]:
        return float(y[-1] + (v - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2]))
    return float(np.interp(v, x, y))


@dataclass(frozen=True)
class TLMCost:
    """Measured time of the compiled TLM on this device: one decision, and scoring one window of tokens."""

    decide_ms: float
    window_ms: float
    window_tokens: int

    def __call__(self, compress_tokens: int, decides: bool = True) -> float:
        windows = math.ceil(compress_tokens / self.window_tokens) if compress_tokens > 0 else 0
        return (self.decide_ms if decides else 0.0) + windows * self.window_ms


NO_TLM = TLMCost(0.0, 0.0, 1)


def compressed_tokens(prompt_tokens: int, query_tokens: int, ratio: float) -> int:
    """LLM tokens after compression to `ratio` (runtime.compress: exact unless the query alone is longer)."""
    return prompt_tokens if ratio >= 1 else max(round(ratio * prompt_tokens), query_tokens)


@dataclass(frozen=True)
class Budgets:
    """A request's SLO in milliseconds, and as fractions of the full model as served here (what the TLM's decision
    head reads)."""

    ttft_ms: float
    tpot_ms: float
    ttft: float
    tpot: float


def budgets(
    slo: SLO, latency: LatencyModel, prompt_tokens: int, served: tuple[float, float] = (1.0, 1.0), new_tokens: int = 0
) -> Budgets:
    """The SLO's budgets for a prompt of `prompt_tokens` and an answer of up to `new_tokens`. Relative SLOs are
    fractions of the full model's latency on that uncompressed prompt as served here: the profile's times `served`
    (Calibration.served)."""
    full = max(latency.levels)
    full_ttft = served[0] * latency.ttft(full, prompt_tokens)
    full_tpot = served[1] * latency.tpot(full, prompt_tokens + new_tokens / 2)
    ttft, tpot = (slo.ttft * full_ttft, slo.tpot * full_tpot) if slo.relative else (slo.ttft, slo.tpot)
    return Budgets(ttft, tpot, ttft / full_ttft, tpot / full_tpot)


@dataclass(frozen=True)
class Preference:
    """The TLM decision head's log-probability of each (prompt ratio, level) plan."""

    scores: dict[tuple[float, float], float]

    @classmethod
    def from_heads(cls, ratios, ratio_logp, levels, level_logp) -> Preference:
        """The joint log-probability of the two heads' independent choices."""
        return cls({(r, lv): float(a + b) for r, a in zip(ratios, ratio_logp) for lv, b in zip(levels, level_logp)})

    def __call__(self, ratio: float, level: float) -> float:
        return self.scores[(ratio, level)]


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan policy decides on, for one request."""

    prompt_tokens: int  # LLM tokens of the whole prompt, uncompressed
    query_tokens: int  # of those, the tokens that are never compressed (the user's query)
    budgets: Budgets
    ratios: tuple[float, ...]  # prompt ratios the TLM can compress to ((1.0,) when nothing is compressible)
    levels: tuple[float, ...]  # model levels to choose from
    tlm: TLMCost = NO_TLM  # the TLM's measured cost here
    preference: Preference | None = None  # the TLM's decision (the "elastilm" policy only)
    scale: tuple[float, float] = (1.0, 1.0)  # measured / predicted TTFT and TPOT (Calibration.plan_scale)
    new_tokens: int = 0  # the answer's max_tokens: TPOT is predicted halfway through it


class Calibration:
    """How the latency this process measures compares with the profile's predictions: the ratios measured /
    predicted of the last `window` answers, for TTFT and for TPOT. The profile is measured in a quiet process; a
    serving process shares its cores with HTTP and clients and runs slower, and single requests scatter. Plans
    use a high quantile of the ratios (`plan_scale`: room for the scatter, so that a plan predicted to fit
    mostly does), relative budgets the median (`served`: the full model as it typically runs here). Both are 1.0
    until `minimum` answers were seen, and clamped to [0.5, 3]."""

    def __init__(self, window: int = 32, quantile: float = 0.75, minimum: int = 4):
        self.ratios = (deque(maxlen=window), deque(maxlen=window))
        self.quantile, self.minimum = quantile, minimum

    def add(self, k: int, measured_ms: float, predicted_ms: float) -> None:
        """One answer's measured time against the profile's own prediction (unscaled); k = 0 TTFT, 1 TPOT."""
        if measured_ms > 0 and predicted_ms > 0:
            self.ratios[k].append(measured_ms / predicted_ms)

    def _stat(self, q: float) -> tuple[float, float]:
        return tuple(
            float(np.clip(np.quantile(r, q), 0.5, 3.0)) if len(r) >= self.minimum else 1.0 for r in self.ratios
        )

    @property
    def plan_scale(self) -> tuple[float, float]:
        return self._stat(self.quantile)

    @property
    def served(self) -> tuple[float, float]:
        return self._stat(0.5)

    def to_dict(self) -> dict:
        return {
            "answers": len(self.ratios[0]),
            "plan_scale": [round(x, 3) for x in self.plan_scale],
            "served": [round(x, 3) for x in self.served],
        }


def candidates(
    request: PlanRequest, latency: LatencyModel, ratios, levels, cost: TLMCost = NO_TLM, decides: bool = False
) -> list[Plan]:
    """Every (ratio, level) of `ratios` x `levels` with its predictions (scaled by request.scale, the TLM's time
    `cost` included: a decision when `decides`, scoring when a ratio compresses) and whether it meets the budgets."""
    b = request.budgets
    out = []
    for r in ratios:
        tokens = compressed_tokens(request.prompt_tokens, request.query_tokens, r)
        tlm_ms = cost(request.prompt_tokens - request.query_tokens if r < 1 else 0, decides)
        for lv in levels:
            ttft = request.scale[0] * (latency.ttft(lv, tokens) + tlm_ms)
            tpot = request.scale[1] * latency.tpot(lv, tokens + request.new_tokens / 2)
            ok = ttft <= b.ttft_ms * (1 + 1e-9) and tpot <= b.tpot_ms * (1 + 1e-9)
            out.append(Plan(r, lv, tokens, ttft, tpot, tlm_ms, ok, ""))
    return out


def fastest(plans: list[Plan]) -> Plan:
    return min(plans, key=lambda p: (p.tpot_ms, p.ttft_ms, p.level, p.ratio))


def _best(plans: list[Plan], key, name: str) -> Plan:
    """The feasible plan with the largest `key`; the fastest one when none is feasible (it misses the SLO)."""
    feasible = [p for p in plans if p.feasible]
    return (max(feasible, key=key) if feasible else fastest(plans)).named(name)


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    plan: Callable[[PlanRequest, LatencyModel], Plan]
    decides: bool = False  # plans with the TLM decision head's preference (PlanRequest.preference)
    adapters: bool = True  # False: levels run without their recovery adapters (an ablation)
    scores: bool = True  # False: compression keeps the end of the context instead of the TLM's scores (an ablation)

    @property
    def variant(self) -> str:
        """How the chosen plan runs, beyond (ratio, level, dropped): "" as built, or the ablation's name."""
        return "" if self.adapters and self.scores else "no-adapters" if self.scores else "no-score-head"


STRATEGIES: dict[str, Strategy] = {}  # plan policies by name, in the order they are compared


def strategy(name: str, description: str, **how):
    """Register a plan policy `fn(request, latency) -> Plan` under `name` (`how`: Strategy.decides, .adapters,
    .scores)."""

    def register(fn):
        STRATEGIES[name] = Strategy(name, description, fn, **how)
        return fn

    return register


def choose(name: str, request: PlanRequest, latency: LatencyModel) -> Plan:
    """The plan the policy `name` picks for `request`."""
    if name not in STRATEGIES:
        raise ElastiLMError(f"unknown strategy '{name}'; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name].plan(request, latency)


@strategy("elastilm", "ElastiLM (TLM-planned)", decides=True)
def _elastilm(request: PlanRequest, latency: LatencyModel) -> Plan:
    """The TLM decision head's choice when that meets the SLO; otherwise the feasible plan the head scores best;
    if nothing meets the SLO, the fastest plan, marked infeasible. The TLM's decision always counts in TTFT."""
    pref = request.preference
    if pref is None:
        raise ElastiLMError("the elastilm strategy plans with the TLM's decision (PlanRequest.preference)")
    plans = candidates(request, latency, request.ratios, request.levels, request.tlm, decides=True)
    key = lambda p: (pref(p.ratio, p.level), p.level, p.ratio)  # noqa: E731
    best = max(plans, key=key)
    if best.feasible:
        return best.named("tlm")
    feasible = [p for p in plans if p.feasible]
    if feasible:
        return max(feasible, key=key).named("best feasible")
    return fastest(plans).named("fastest (SLO infeasible)")


@strategy("full", "full model always")
def _full(request: PlanRequest, latency: LatencyModel) -> Plan:
    return candidates(request, latency, (1.0,), (max(request.levels),))[0].named("full")


@strategy("model-only", "model-only (largest feasible level)")
def _model_only(request: PlanRequest, latency: LatencyModel) -> Plan:
    return _best(candidates(request, latency, (1.0,), request.levels), lambda p: p.level, "model-only")


@strategy("prompt-only", "prompt-only (full model, compressed)")
def _prompt_only(request: PlanRequest, latency: LatencyModel) -> Plan:
    """Pays for the TLM's scoring, not for a decision."""
    plans = candidates(request, latency, request.ratios, (max(request.levels),), request.tlm)
    return _best(plans, lambda p: p.ratio, "prompt-only")


@strategy("smallest", "fixed smallest level")
def _smallest(request: PlanRequest, latency: LatencyModel) -> Plan:
    return _best(candidates(request, latency, (1.0,), (min(request.levels),)), lambda p: 0, "smallest")


@strategy("layer-drop", "layer dropping (ShortGPT, fewest layers dropped that fit)")
def _layer_drop(request: PlanRequest, latency: LatencyModel) -> Plan:
    """Runs at level 1.0 with layers skipped: planned over the variants' own profile (LatencyModel.layer_drop)."""
    drops = latency.layer_drop
    if drops is None:
        raise ElastiLMError(
            "this build has no layer-drop variants: run `elastilm layer-drop`, then compile and profile again"
        )
    best = _best(candidates(request, drops, (1.0,), drops.levels), lambda p: p.level, "layer-drop")
    return replace(best, level=1.0, dropped=drops.dropped[best.level])


@strategy("no-decision-head", "ElastiLM without its decision head (largest feasible level, then ratio)")
def _no_decision_head(request: PlanRequest, latency: LatencyModel) -> Plan:
    """The ablation of the TLM's decision head: a fixed rule over the same plans instead, the largest level that
    meets the SLO at some ratio, at the largest such ratio; the TLM still scores what it compresses, but
    decides nothing."""
    plans = candidates(request, latency, request.ratios, request.levels, request.tlm)
    return _best(plans, lambda p: (p.level, p.ratio), "no-decision-head")


# the ablation of the recovery adapters: ElastiLM's plan, run by the levels without them
strategy("no-adapters", "ElastiLM without recovery adapters", decides=True, adapters=False)(_elastilm)


@strategy("no-score-head", "ElastiLM without its score head (keeps the end of the context)", decides=True, scores=False)
def _no_score_head(request: PlanRequest, latency: LatencyModel) -> Plan:
    """The ablation of the TLM's score head: ElastiLM's plan, the context compressed by position
    (compress.Recency), which costs no TLM scoring."""
    return _elastilm(replace(request, tlm=replace(request.tlm, window_ms=0.0)), latency)
