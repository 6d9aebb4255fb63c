"""Choose (prompt ratio, level) for a request under its latency objective (SLO: TTFT and TPOT budgets).

Predictions come from the build's `latency.json` (`elastilm profile`): TTFT per level at several prompt lengths
(linear in between and beyond), TPOT per level. Measurements are noisy, and a bigger level is never really
faster, so each column is made monotone over levels (pool-adjacent-violators) before use. The TLM's own time
counts inside TTFT: its decision over the query always when it plans, and scoring the compressible part when
the ratio is below 1.

A plan is the TLM decision head's choice when that meets the SLO; otherwise the feasible plan the head scores
best; if nothing meets the SLO, the fastest plan, marked infeasible. SLO budgets are milliseconds or fractions
of the full model's latency on this device for this prompt (TTFT at the uncompressed length, TPOT).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from elastilm import ElastiLMError


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


def _monotone(values: np.ndarray) -> np.ndarray:
    """The closest non-decreasing sequence (pool-adjacent-violators, equal weights)."""
    blocks: list[list[float]] = []
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (a, n), (b, m) = blocks[-2], blocks.pop()
            blocks[-1] = [(a * n + b * m) / (n + m), n + m]
    return np.concatenate([[v] * int(n) for v, n in blocks])


class LatencyModel:
    """Predicted TTFT(level, prompt tokens) and TPOT(level) in ms, from a latency profile."""

    def __init__(self, doc: dict):
        if doc.get("schema") != "elastilm.latency":
            raise ElastiLMError("not a latency profile (schema elastilm.latency); make one with `elastilm profile`")
        rows = sorted(doc["levels"], key=lambda r: r["fraction"])
        self.levels = [r["fraction"] for r in rows]
        self.lengths = np.array(doc["prompt_lengths"], float)
        ttft = np.array([r["ttft_ms"] for r in rows], float)
        self._ttft = np.stack([_monotone(ttft[:, j]) for j in range(ttft.shape[1])], 1)
        self._tpot = _monotone(np.array([r["tpot_ms"] for r in rows], float))
        self.device = doc.get("device", "")
        # the layer-dropping variants as a model of their own, over the share of layers kept (1.0: the full model)
        self.layer_drop: LatencyModel | None = None
        self.dropped: dict[float, int] = {}  # share of layers kept -> layers dropped
        drops = doc.get("layer_drop")
        if drops:
            self.layer_drop = LatencyModel({**doc, "levels": [rows[-1], *drops], "layer_drop": None})
            self.layer_drop.dropped = {1.0: 0, **{r["fraction"]: r["dropped"] for r in drops}}

    @classmethod
    def from_file(cls, path: Path) -> "LatencyModel":
        path = Path(path)
        if not path.is_file():
            raise ElastiLMError(f"{path}: no latency profile; measure one with `elastilm profile --build {path.parent}`")
        return cls(json.loads(path.read_text()))

    def _row(self, level: float) -> int:
        for i, f in enumerate(self.levels):
            if abs(f - level) < 1e-9:
                return i
        raise ElastiLMError(f"level {level:g} is not in the latency profile ({', '.join(f'{f:g}' for f in self.levels)})")

    def ttft(self, level: float, tokens: int) -> float:
        """Linear between profiled lengths and along the end segments beyond them; below the shortest length
        never less than proportional to tokens."""
        x, y = self.lengths, self._ttft[self._row(level)]
        if len(x) == 1:
            return float(y[0] * tokens / x[0])
        if tokens <= x[0]:
            return float(max(y[0] + (tokens - x[0]) * (y[1] - y[0]) / (x[1] - x[0]), y[0] * tokens / x[0]))
        if tokens >= x[-1]:
            return float(y[-1] + (tokens - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2]))
        return float(np.interp(tokens, x, y))

    def tpot(self, level: float) -> float:
        return float(self._tpot[self._row(level)])


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


def budgets(slo: SLO, latency: LatencyModel, prompt_tokens: int, served: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """(TTFT, TPOT) budgets in ms. Relative SLOs are fractions of the full model's latency as served here: the
    profile's times `served` (Calibration.served)."""
    if not slo.relative:
        return slo.ttft, slo.tpot
    full = max(latency.levels)
    return slo.ttft * served[0] * latency.ttft(full, prompt_tokens), slo.tpot * served[1] * latency.tpot(full)


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
        return tuple(float(np.clip(np.quantile(r, q), 0.5, 3.0)) if len(r) >= self.minimum else 1.0 for r in self.ratios)

    @property
    def plan_scale(self) -> tuple[float, float]:
        return self._stat(self.quantile)

    @property
    def served(self) -> tuple[float, float]:
        return self._stat(0.5)

    def to_dict(self) -> dict:
        return {"answers": len(self.ratios[0]), "plan_scale": [round(x, 3) for x in self.plan_scale],
                "served": [round(x, 3) for x in self.served]}


def candidates(
    slo: SLO, latency: LatencyModel, prompt_tokens: int, query_tokens: int, ratios, levels, tlm: TLMCost, decides: bool,
    scale: tuple[float, float] = (1.0, 1.0), served: tuple[float, float] = (1.0, 1.0),
) -> list[Plan]:
    """Every (ratio, level) with its predictions and feasibility; `scale` multiplies the predicted TTFT and TPOT,
    `served` the relative budgets (see Calibration)."""
    ttft_budget, tpot_budget = budgets(slo, latency, prompt_tokens, served)
    out = []
    for r in ratios:
        tokens = compressed_tokens(prompt_tokens, query_tokens, r)
        tlm_ms = tlm(prompt_tokens - query_tokens if r < 1 else 0, decides)
        for lv in levels:
            ttft = scale[0] * (latency.ttft(lv, tokens) + tlm_ms)
            tpot = scale[1] * latency.tpot(lv)
            ok = ttft <= ttft_budget * (1 + 1e-9) and tpot <= tpot_budget * (1 + 1e-9)
            out.append(Plan(r, lv, tokens, ttft, tpot, tlm_ms, ok, ""))
    return out


def fastest(plans: list[Plan]) -> Plan:
    return min(plans, key=lambda p: (p.tpot_ms, p.ttft_ms, p.level, p.ratio))


def plan(
    slo: SLO, latency: LatencyModel, prompt_tokens: int, query_tokens: int, ratios, levels,
    preference: Callable[[float, float], float], tlm: TLMCost, scale: tuple[float, float] = (1.0, 1.0),
    served: tuple[float, float] = (1.0, 1.0),
) -> Plan:
    """The plan for one request. `preference(ratio, level)`: the TLM decision head's joint log-probability."""
    plans = candidates(slo, latency, prompt_tokens, query_tokens, ratios, levels, tlm, True, scale, served)
    best = max(plans, key=lambda p: (preference(p.ratio, p.level), p.level, p.ratio))
    if best.feasible:
        return _named(best, "tlm")
    feasible = [p for p in plans if p.feasible]
    if feasible:
        return _named(max(feasible, key=lambda p: (preference(p.ratio, p.level), p.level, p.ratio)), "best feasible")
    return _named(fastest(plans), "fastest (SLO infeasible)")


def _named(p: Plan, how: str) -> Plan:
    return Plan(**{**asdict(p), "chosen_by": how})


# Plan policies: ElastiLM's and the baselines it is compared with. A baseline with no feasible point runs its
# fastest one (and misses the SLO).
STRATEGIES = {
    "elastilm": "ElastiLM (TLM-planned)",
    "full": "full model always",
    "model-only": "model-only (largest feasible level)",
    "prompt-only": "prompt-only (full model, compressed)",
    "smallest": "fixed smallest level",
    "layer-drop": "layer dropping (ShortGPT, fewest layers dropped that fit)",
}


def _best(plans: list[Plan], key, name: str) -> Plan:
    feasible = [p for p in plans if p.feasible]
    return _named(max(feasible, key=key) if feasible else fastest(plans), name)


def choose(
    strategy: str, slo: SLO, latency: LatencyModel, prompt_tokens: int, query_tokens: int, ratios, levels,
    cost: TLMCost, preference: Callable[[float, float], float] | None = None, scale: tuple[float, float] = (1.0, 1.0),
    served: tuple[float, float] = (1.0, 1.0),
) -> Plan:
    """The plan `strategy` picks; `preference(ratio, level)` is the TLM's (elastilm only); baselines that do not
    compress do not run the TLM, prompt-only pays for its scoring but not for a decision."""
    full = (max(levels),)
    if strategy == "elastilm":
        return plan(slo, latency, prompt_tokens, query_tokens, ratios, levels, preference, cost, scale, served)
    if strategy == "full":
        return _named(candidates(slo, latency, prompt_tokens, query_tokens, (1.0,), full, NO_TLM, False, scale, served)[0], strategy)
    if strategy == "model-only":
        plans = candidates(slo, latency, prompt_tokens, query_tokens, (1.0,), levels, NO_TLM, False, scale, served)
        return _best(plans, lambda p: p.level, strategy)
    if strategy == "prompt-only":
        plans = candidates(slo, latency, prompt_tokens, query_tokens, ratios, full, cost, False, scale, served)
        return _best(plans, lambda p: p.ratio, strategy)
    if strategy == "smallest":
        plans = candidates(slo, latency, prompt_tokens, query_tokens, (1.0,), (min(levels),), NO_TLM, False, scale, served)
        return _best(plans, lambda p: 0, strategy)
    if strategy == "layer-drop":
        drops = latency.layer_drop
        if drops is None:
            raise ElastiLMError("this build has no layer-drop variants: run `elastilm layer-drop`, then compile and profile again")
        plans = candidates(slo, drops, prompt_tokens, query_tokens, (1.0,), drops.levels, NO_TLM, False, scale, served)
        best = _best(plans, lambda p: p.level, strategy)
        return Plan(**{**asdict(best), "level": 1.0, "dropped": drops.dropped[best.level]})
    raise ElastiLMError(f"unknown strategy '{strategy}'; known: {', '.join(STRATEGIES)}")
