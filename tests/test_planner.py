"""The planner on synthetic latency tables: predictions, feasibility (property-based), fallbacks, baselines."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import planner

LEVELS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
RATIOS = [1.0, 0.8, 0.6, 0.4, 0.2]
LENGTHS = [32, 128, 512]


def table(base: float = 10.0, per_token: float = 2.0, tpot_floor: float = 0.6, noise: np.ndarray | None = None) -> dict:
    """A latency profile where time grows with the level: TTFT = level-scaled (base + per_token * tokens), TPOT =
    level-scaled (40 + 0.02 * context tokens)."""
    rows = []
    for i, f in enumerate(LEVELS):
        scale = tpot_floor + (1 - tpot_floor) * f
        ttft = [scale * (base + per_token * n) for n in LENGTHS]
        if noise is not None:
            ttft = [t * (1 + noise[i]) for t in ttft]
        rows.append({"fraction": f, "ttft_ms": ttft, "tpot_ms": [scale * (40.0 + 0.02 * n) for n in LENGTHS]})
    return {"schema": "elastilm.latency", "schema_version": 2, "prompt_lengths": LENGTHS, "levels": rows}


def test_predictions_interpolate_and_extrapolate():
    lat = planner.LatencyModel(table())
    scale = 0.6 + 0.4 * 0.5
    assert lat.ttft(0.5, 128) == pytest.approx(scale * (10 + 2 * 128))
    assert lat.ttft(0.5, 300) == pytest.approx(scale * (10 + 2 * 300))  # linear in between
    assert lat.ttft(0.5, 900) == pytest.approx(scale * (10 + 2 * 900))  # along the last segment
    assert lat.ttft(0.5, 16) == pytest.approx(scale * (10 + 2 * 16))
    assert lat.tpot(1.0, 128) == pytest.approx(40.0 + 0.02 * 128)
    assert lat.tpot(0.5, 300) == pytest.approx(scale * (40 + 0.02 * 300))  # linear in between
    assert lat.tpot(0.5, 900) == pytest.approx(scale * (40 + 0.02 * 900))  # along the last segment
    assert lat.tpot(0.5, 8) == pytest.approx(scale * (40 + 0.02 * 32))  # below: the shortest length's time
    with pytest.raises(ElastiLMError, match="0.25 is not in the latency profile"):
        lat.tpot(0.25, 32)


def test_noisy_profile_is_made_monotone_over_levels():
    """Pool-adjacent-violators against a hand computation: a dip at 0.8 is averaged with 0.7."""
    doc = table()
    doc["levels"][6]["tpot_ms"] = [t - 0.5 for t in doc["levels"][5]["tpot_ms"]]  # 0.8 measured faster than 0.7
    lat = planner.LatencyModel(doc)
    for n in LENGTHS:
        i = LENGTHS.index(n)
        expected = (doc["levels"][5]["tpot_ms"][i] + doc["levels"][6]["tpot_ms"][i]) / 2
        assert lat.tpot(0.7, n) == pytest.approx(expected) and lat.tpot(0.8, n) == pytest.approx(expected)
        assert all(lat.tpot(a, n) <= lat.tpot(b, n) for a, b in zip(LEVELS, LEVELS[1:]))


def test_tpot_over_the_context_is_a_fitted_line():
    """TPOT after each prompt length is smoothed to its least-squares line (numpy's polyfit as the reference);
    a measured fall with the context (noise: attention only adds work) becomes the flat mean."""
    doc = table()
    noisy = [41.0, 40.2, 52.0]
    doc["levels"][-1]["tpot_ms"] = noisy
    doc["levels"][0]["tpot_ms"] = [30.0, 29.0, 28.0]
    for level in LEVELS[1:-1]:
        doc["levels"][LEVELS.index(level)]["tpot_ms"] = [27.0, 27.0, 27.0]
    lat = planner.LatencyModel(doc)
    slope, intercept = np.polyfit(LENGTHS, noisy, 1)
    for n in (32, 100, 128, 400, 512):
        assert lat.tpot(1.0, n) == pytest.approx(intercept + slope * n)
    # 0.2 falls with the context: its mean, 29, then pooled with the flat 27s above it (monotone over levels)
    pooled = (29.0 + 27.0 * 7) / 8
    assert [lat.tpot(0.2, n) for n in (32, 512)] == pytest.approx([pooled, pooled])


def test_a_profile_without_one_tpot_per_length_is_refused():
    doc = table()
    doc["levels"][3]["tpot_ms"] = [40.0]
    with pytest.raises(ElastiLMError, match="level 0.5 has 3 TTFT and 1 TPOT times for 3 prompt lengths"):
        planner.LatencyModel(doc)


def test_tpot_is_predicted_halfway_through_the_answer():
    """A plan's TPOT is the profile's at the compressed prompt plus half of max_tokens, and a relative TPOT
    budget is the full model's on the uncompressed prompt with the same answer."""
    lat = planner.LatencyModel(table())
    b = planner.budgets(planner.SLO(1.0, 0.9), lat, 400, new_tokens=200)
    assert b.tpot_ms == pytest.approx(0.9 * lat.tpot(1.0, 500))
    request = planner.PlanRequest(400, 20, b, (0.5,), (0.6,), new_tokens=200)
    (p,) = planner.candidates(request, lat, (0.5,), (0.6,))
    assert p.tokens == 200 and p.tpot_ms == pytest.approx(lat.tpot(0.6, 300))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "0.5"])
def test_bad_slo_is_refused(bad):
    with pytest.raises(ElastiLMError, match="positive number"):
        planner.SLO(bad, 0.9)


def test_compressed_tokens_are_the_compressor_budget():
    assert planner.compressed_tokens(300, 20, 1.0) == 300
    assert planner.compressed_tokens(300, 20, 0.6) == 180
    assert planner.compressed_tokens(300, 100, 0.2) == 100  # the query alone is longer than the budget


def _random_preference(seed: int) -> planner.Preference:
    rng = np.random.default_rng(seed)
    return planner.Preference({(r, lv): float(rng.normal()) for r in RATIOS for lv in LEVELS})


def _preference(fn) -> planner.Preference:
    return planner.Preference({(r, lv): fn(r, lv) for r in RATIOS for lv in LEVELS})


def _request(
    slo,
    lat,
    prompt,
    query,
    ratios=RATIOS,
    levels=LEVELS,
    cost=planner.NO_TLM,
    preference=None,
    scale=(1.0, 1.0),
    answer=0,
):
    budgets = planner.budgets(slo, lat, prompt, new_tokens=answer)
    return planner.PlanRequest(prompt, query, budgets, ratios, levels, cost, preference, scale, answer)


def _plan(slo, lat, prompt, query, preference, cost, scale=(1.0, 1.0), answer=0) -> planner.Plan:
    """ElastiLM's plan (the TLM's `preference`)."""
    request = _request(slo, lat, prompt, query, cost=cost, preference=preference, scale=scale, answer=answer)
    return planner.choose("elastilm", request, lat)


@settings(max_examples=300, deadline=None)
@given(
    ttft=st.floats(0.05, 1.5),
    tpot=st.floats(0.3, 1.5),
    prompt=st.integers(8, 1500),
    query_share=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    noise=st.lists(st.floats(-0.1, 0.1), min_size=9, max_size=9),
    window_ms=st.floats(0.0, 50.0),
    relative=st.booleans(),
    answer=st.integers(0, 400),
)
def test_plan_never_breaks_a_feasible_slo(ttft, tpot, prompt, query_share, seed, noise, window_ms, relative, answer):
    """Whatever the TLM prefers: if some plan meets the SLO, the chosen one does (by the same predictions,
    recomputed here from the table); if none does, the plan says so and is the fastest."""
    lat = planner.LatencyModel(table(noise=np.array(noise)))
    query = int(query_share * prompt)
    cost = planner.TLMCost(window_ms / 2, window_ms, 126)
    slo = planner.SLO(ttft * (1 if relative else 600), tpot * (1 if relative else 40), relative)
    p = _plan(slo, lat, prompt, query, _random_preference(seed), cost, answer=answer)
    ttft_budget = slo.ttft * lat.ttft(1.0, prompt) if relative else slo.ttft
    tpot_budget = slo.tpot * lat.tpot(1.0, prompt + answer / 2) if relative else slo.tpot

    def meets(r, lv):
        tokens = prompt if r == 1 else max(round(r * prompt), query)
        tlm = cost.decide_ms + (np.ceil((prompt - query) / 126) * window_ms if r < 1 and prompt > query else 0)
        tpot_ms = lat.tpot(lv, tokens + answer / 2)
        return lat.ttft(lv, tokens) + tlm <= ttft_budget * (1 + 1e-9) and tpot_ms <= tpot_budget * (1 + 1e-9)

    any_feasible = any(meets(r, lv) for r in RATIOS for lv in LEVELS)
    assert p.feasible == any_feasible
    if any_feasible:
        assert meets(p.ratio, p.level)
        assert p.ttft_ms <= ttft_budget * (1 + 1e-9) and p.tpot_ms <= tpot_budget * (1 + 1e-9)
    else:
        assert p.chosen_by == "fastest (SLO infeasible)"
        assert p.level == min(LEVELS)


def test_the_tlm_choice_wins_when_feasible_and_the_best_feasible_otherwise():
    lat = planner.LatencyModel(table())
    slo = planner.SLO(0.5, 0.95)
    favourite = lambda r, lv: 10.0 if (r, lv) == (0.6, 0.5) else (5.0 if (r, lv) == (1.0, 1.0) else 0.0)  # noqa: E731
    p = _plan(slo, lat, 400, 20, _preference(favourite), planner.NO_TLM)
    assert (p.ratio, p.level, p.chosen_by) == (0.6, 0.5, "tlm")
    wants_full = lambda r, lv: 10.0 if (r, lv) == (1.0, 1.0) else (1.0 if (r, lv) == (0.4, 0.8) else 0.0)  # noqa: E731
    p = _plan(slo, lat, 400, 20, _preference(wants_full), planner.NO_TLM)
    assert (p.ratio, p.level, p.chosen_by) == (0.4, 0.8, "best feasible")


def test_tlm_cost_counts_inside_ttft():
    """A plan that fits without the TLM's time does not fit with it."""
    lat = planner.LatencyModel(table())
    full = lat.ttft(1.0, 400)
    needed = lat.ttft(0.5, 240)  # ratio 0.6 at level 0.5
    slo = planner.SLO((needed + 5.0) / full, 1.0)
    pref = lambda r, lv: 1.0 if (r, lv) == (0.6, 0.5) else 0.0  # noqa: E731
    assert _plan(slo, lat, 400, 20, _preference(pref), planner.TLMCost(1.0, 1.0, 126)).ratio == 0.6
    slow = _plan(slo, lat, 400, 20, _preference(pref), planner.TLMCost(1.0, 10.0, 126))
    assert (slow.ratio, slow.level) != (0.6, 0.5) and slow.tlm_ms > 0


def test_baselines_pick_their_own_dimension():
    lat = planner.LatencyModel(table())
    slo = planner.SLO(0.7, 0.7)
    request = _request(slo, lat, 400, 20, cost=planner.TLMCost(1.0, 1.0, 126))
    model_only = planner.choose("model-only", request, lat)
    assert model_only.ratio == 1.0 and model_only.feasible
    assert not planner.candidates(request, lat, (1.0,), [lv for lv in LEVELS if lv > model_only.level])[0].feasible
    prompt_only = planner.choose("prompt-only", request, lat)
    assert prompt_only.level == 1.0
    assert not prompt_only.feasible  # TPOT 0.7 of the full model's: above it even after the shortest prompt
    smallest = planner.choose("smallest", request, lat)
    assert (smallest.ratio, smallest.level) == (1.0, 0.2)
    full = planner.choose("full", request, lat)
    assert (full.ratio, full.level, full.tlm_ms) == (1.0, 1.0, 0.0)
    with pytest.raises(ElastiLMError, match="unknown strategy 'oracle'; known: elastilm, full"):
        planner.choose("oracle", request, lat)


@given(st.floats(0.15, 1.2), st.floats(0.3, 1.2), st.integers(40, 700), st.floats(0.0, 10.0), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_without_the_decision_head_the_largest_feasible_level_then_ratio(ttft, tpot, prompt, window_ms, seed):
    """The ablation ignores the TLM's preference; it pays for scoring what it compresses, never for a decision."""
    lat = planner.LatencyModel(table())
    cost = planner.TLMCost(7.0, window_ms, 126)
    request = _request(planner.SLO(ttft, tpot), lat, prompt, 20, cost=cost, preference=_random_preference(seed))
    p = planner.choose("no-decision-head", request, lat)
    b = request.budgets

    def predicted(r, lv):
        tokens = prompt if r == 1 else max(round(r * prompt), 20)
        scoring = np.ceil((prompt - 20) / 126) * window_ms if r < 1 else 0.0
        return lat.ttft(lv, tokens) + scoring, lat.tpot(lv, tokens)

    def fits(r, lv):
        t, d = predicted(r, lv)
        return t <= b.ttft_ms * (1 + 1e-9) and d <= b.tpot_ms * (1 + 1e-9)

    feasible = [(lv, r) for r in RATIOS for lv in LEVELS if fits(r, lv)]
    assert p.feasible == bool(feasible) and p.tlm_ms == pytest.approx(
        predicted(p.ratio, p.level)[0] - lat.ttft(p.level, p.tokens)
    )
    if feasible:
        assert (p.level, p.ratio) == max(feasible)
    else:
        assert p.level == min(LEVELS)


def test_scaled_predictions_tighten_plans():
    """The runtime's measured/predicted ratio scales every prediction: a plan that fits the profile does not fit
    a process running 1.5x slower."""
    lat = planner.LatencyModel(table())
    slo = planner.SLO(0.8, 0.95)
    pref = lambda r, lv: lv  # noqa: E731  (prefers big levels)
    quiet = _plan(slo, lat, 400, 20, _preference(pref), planner.NO_TLM)
    slow = _plan(slo, lat, 400, 20, _preference(pref), planner.NO_TLM, scale=(1.5, 1.0))
    budget = 0.8 * lat.ttft(1.0, 400)
    assert quiet.feasible and slow.feasible and (slow.ratio, slow.level) != (quiet.ratio, quiet.level)
    assert 1.5 * lat.ttft(quiet.level, quiet.tokens) > budget >= slow.ttft_ms  # the quiet plan no longer fits
    assert slow.ttft_ms == pytest.approx(1.5 * lat.ttft(slow.level, slow.tokens))


def test_calibration_is_a_quantile_of_recent_ratios():
    """Plans scale predictions by a high quantile of measured/predicted, relative budgets by the median; both
    stay 1.0 until enough answers were seen, forget old ones, and are clamped."""
    cal = planner.Calibration(window=8, quantile=0.75, minimum=4)
    for r in (1.1, 1.3, 1.2):
        cal.add(0, 100 * r, 100)
    assert cal.plan_scale == (1.0, 1.0) and cal.served == (1.0, 1.0)  # 3 answers: not yet
    cal.add(0, 140, 100)
    assert cal.plan_scale[0] == pytest.approx(np.quantile([1.1, 1.3, 1.2, 1.4], 0.75))
    assert cal.served[0] == pytest.approx(1.25) and cal.served[1] == 1.0  # TPOT has its own window
    for _ in range(8):
        cal.add(0, 90, 100)  # the old ratios leave the window
    assert cal.plan_scale[0] == pytest.approx(0.9) and cal.served[0] == pytest.approx(0.9)
    for _ in range(8):
        cal.add(1, 1e6, 1)
    assert cal.plan_scale[1] == 3.0 and cal.to_dict()["answers"] == 8


def test_served_budgets_follow_the_full_model_as_served():
    lat = planner.LatencyModel(table())
    quiet = planner.budgets(planner.SLO(0.5, 0.8), lat, 128)
    served = planner.budgets(planner.SLO(0.5, 0.8), lat, 128, served=(1.2, 1.1))
    assert (served.ttft_ms, served.tpot_ms) == pytest.approx((1.2 * quiet.ttft_ms, 1.1 * quiet.tpot_ms))
    assert (served.ttft, served.tpot) == pytest.approx((0.5, 0.8))  # still half the full model as served
    ms = planner.budgets(planner.SLO(300, 60, relative=False), lat, 128, served=(1.2, 1.1))
    assert (ms.ttft_ms, ms.tpot_ms) == (300, 60)  # ms are ms
