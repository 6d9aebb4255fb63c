"""The layer-dropping baseline (ShortGPT): Block Influence against transformers, the compiled variants against the
torch reference with the dropped layers skipped, their KV caches, profile rows, the planner and the orchestrator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import elastified_tiny, random_ids, tiny_build_with_tlm, tiny_model

from elastilm.compile import layer_drop, reference
from elastilm.compile.build import build
from elastilm.formats import elastic as artifact
from elastilm.formats import layer_drop as layer_drop_file
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import planner
from elastilm.runtime_py.engine import ElasticEngine


def test_block_influence_matches_transformers_hidden_states():
    """BI from our reference equals 1 - cos over the inputs and outputs of transformers' own decoder layers."""
    hf, params, cfg = tiny_model("llama-untied-bias", seed=3)
    windows = random_ids(cfg, batch=3, length=9, seed=4)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x, output[0] if isinstance(output, tuple) else output))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in hf.model.layers]
    expected = np.zeros(cfg.num_layers)
    with torch.no_grad():
        for w in windows:
            seen.clear()
            hf(w[None])
            for i, (x, y) in enumerate(seen):
                expected[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).mean().item() / len(windows)
    for h in handles:
        h.remove()
    got = layer_drop.block_influence(params, cfg, windows, progress=False).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert got.std() > 1e-3  # the layers differ, so the order means something


def test_variants_follow_the_scores_and_the_level_budgets():
    scores = torch.tensor([0.9, 0.1, 0.05, 0.3, 0.05, 0.7])
    assert layer_drop.drop_counts(6, [0.24, 0.5, 0.51, 0.9, 1.0]) == [1, 3, 5]  # distinct, ascending, one layer stays
    drops = layer_drop.plan_drops(scores, [1, 2, 3, 5])
    assert drops == {1: [4], 2: [2, 4], 3: [1, 2, 4], 5: [1, 2, 3, 4, 5]}  # ties: the later layer goes first
    assert all(set(drops[a]) <= set(drops[b]) for a, b in zip([1, 2, 3], [2, 3, 5]))  # nested, as ShortGPT's are


@pytest.fixture(scope="module")
def dropped_build(tmp_path_factory):
    folder = elastified_tiny(tmp_path_factory, "llama-untied-bias", neuron_multiple=1)
    doc = layer_drop.layer_drop(folder, progress=False)
    return folder, doc, build(folder, "host-cpu", max_len=40)


def skip_widths(cfg, layers):
    return [(0, 0) if i in layers else (cfg.num_heads, cfg.intermediate_size) for i in range(cfg.num_layers)]


def test_compiled_variants_equal_the_reference_with_layers_skipped(dropped_build):
    folder, doc, out = dropped_build
    model = artifact.load(folder, with_tokenizer=False)
    params = {k: v.double() for k, v in model.params.items()}
    engine = ElasticEngine(out)
    assert engine.layer_drops == {int(n): v for n, v in doc["variants"].items()} and len(engine.layer_drops) >= 2
    ids = random_ids(model.config, 1, 13, seed=7)[0].tolist()
    full = engine.prefill(ids, 1.0)
    for n, layers in engine.layer_drops.items():
        got = engine.dropped(n).prefill(ids, 1.0)
        expected = reference.logits(params, model.config, torch.tensor([ids]), skip_widths(model.config, layers))[
            0, -1
        ].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
        assert np.abs(got - full).max() > 1e-2  # really a different model


def test_dropped_layers_leave_their_cache_alone_and_decode_matches_recompute(dropped_build):
    folder, _, out = dropped_build
    engine = ElasticEngine(out)
    n, layers = max(engine.layer_drops.items())
    view = engine.dropped(n)
    poison = 7.25
    for i in layers:
        for c in engine.caches[2 * i : 2 * i + 2]:
            c.copyfrom(np.full(c.shape, poison, "float32"))
    cfg = artifact.load(folder, with_tokenizer=False).config
    ids = random_ids(cfg, 1, 9, seed=2)[0].tolist()
    view.prefill(ids[:6], 1.0)
    stepped = [view.decode(t, 6 + k, 1.0) for k, t in enumerate(ids[6:])]
    for i in layers:
        assert all((c.numpy() == poison).all() for c in engine.caches[2 * i : 2 * i + 2]), (
            f"layer {i} was dropped but written"
        )
    kept = next(i for i in range(cfg.num_layers) if i not in layers)
    assert np.abs(engine.caches[2 * kept + 1].numpy()[:9]).max() > 0  # kept layers wrote theirs
    for k, logits in enumerate(stepped):
        np.testing.assert_allclose(logits, engine.dropped(n).prefill(ids[: 7 + k], 1.0), rtol=0, atol=2e-4)


def test_view_generates_the_reference_greedy_and_shares_the_engine(dropped_build):
    folder, _, out = dropped_build
    model = artifact.load(folder, with_tokenizer=False)
    engine = ElasticEngine(out)
    n, layers = min(engine.layer_drops.items())
    view = engine.dropped(n)
    assert view.params is engine.params and view.caches is engine.caches and list(view.levels) == [1.0]
    assert engine.dropped(0) is engine and engine.functions["prefill"] is not view.functions["prefill"]
    ids = random_ids(model.config, 1, 5, seed=11)[0].tolist()
    got = list(view.generate_ids(ids, 1.0, max_new_tokens=6))
    seq = list(ids)
    for _ in range(6):
        logits = reference.logits(model.params, model.config, torch.tensor([seq]), skip_widths(model.config, layers))[
            0, -1
        ]
        seq.append(int(logits.argmax()))
    assert got == seq[len(ids) :]
    with pytest.raises(ElastiLMError, match="no variant with 29 layers dropped"):
        engine.dropped(29)
    with pytest.raises(ElastiLMError, match="unknown level 0.5"):
        view.prefill(ids, 0.5)


def test_bad_layer_drop_file_is_refused(dropped_build, tmp_path):
    folder, doc, _ = dropped_build
    bad = {**doc, "variants": {"2": [0, 0]}}
    (tmp_path / layer_drop_file.FILE).write_text(json.dumps(bad))
    with pytest.raises(ElastiLMError, match="not 2 distinct layers"):
        layer_drop_file.read_variants(tmp_path, 4)
    (tmp_path / layer_drop_file.FILE).write_text(json.dumps({**doc, "schema_version": 9}))
    with pytest.raises(ElastiLMError, match="this elastilm reads elastilm.layer-drop v1"):
        layer_drop_file.read_variants(tmp_path, 4)
    assert layer_drop_file.read_variants(tmp_path / "none", 4) == {}


def test_profile_measures_the_variants(dropped_build):
    from elastilm.runtime_py.profile import markdown, profile

    _, doc, out = dropped_build
    lat = profile(ElasticEngine(out), prompt_lengths=(4, 8), decode_tokens=2, repeat=1, progress=False)
    assert [r["dropped"] for r in lat["layer_drop"]] == sorted(int(n) for n in doc["variants"])
    assert all(
        r["fraction"] == pytest.approx(1 - r["dropped"] / 4) and len(r["ttft_ms"]) == 2 for r in lat["layer_drop"]
    )
    model = planner.LatencyModel(lat)
    assert sorted(model.layer_drop.dropped.values()) == [0] + sorted(r["dropped"] for r in lat["layer_drop"])
    assert "drop 1 layers" in markdown(lat) or "drop 2 layers" in markdown(lat)


def drop_table() -> dict:
    """Elastic levels with a TPOT floor of 0.6, and layer-drop variants of 30 layers whose time is proportional to
    the layers kept."""
    rows = [
        {"fraction": f, "ttft_ms": [10 * (0.6 + 0.4 * f), 100 * (0.6 + 0.4 * f)], "tpot_ms": [10 * (0.6 + 0.4 * f)] * 2}
        for f in (0.2, 0.5, 1.0)
    ]
    drops = [
        {
            "fraction": 1 - n / 30,
            "dropped": n,
            "layers": list(range(n)),
            "ttft_ms": [10 * (1 - n / 30), 100 * (1 - n / 30)],
            "tpot_ms": [10 * (1 - n / 30)] * 2,
        }
        for n in (3, 9, 15, 23)
    ]
    return {
        "schema": "elastilm.latency",
        "schema_version": 2,
        "prompt_lengths": [10, 100],
        "levels": rows,
        "layer_drop": drops,
    }


def _request(slo, lat) -> planner.PlanRequest:
    """A prompt of 50 tokens, 5 of them the query, nothing to compress."""
    return planner.PlanRequest(50, 5, planner.budgets(slo, lat, 50), (1.0,), tuple(lat.levels))


@pytest.mark.parametrize(
    "tpot, dropped, feasible",
    [(1.0, 0, True), (0.95, 3, True), (0.7, 9, True), (0.5, 15, True), (0.3, 23, True), (0.2, 23, False)],
)
def test_layer_drop_strategy_keeps_the_most_layers_that_fit(tpot, dropped, feasible):
    lat = planner.LatencyModel(drop_table())
    p = planner.choose("layer-drop", _request(planner.SLO(1.0, tpot), lat), lat)
    assert (p.dropped, p.level, p.ratio, p.feasible) == (dropped, 1.0, 1.0, feasible)
    assert p.tpot_ms == pytest.approx(10 * (1 - dropped / 30))
    if tpot < 0.6:  # below the elastic TPOT floor: no elastic plan fits, while layer dropping still may
        assert not planner.choose("model-only", _request(planner.SLO(1.0, tpot), lat), lat).feasible


def test_layer_drop_strategy_needs_the_variants():
    doc = drop_table()
    del doc["layer_drop"]
    lat = planner.LatencyModel(doc)
    with pytest.raises(ElastiLMError, match="run `elastilm layer-drop`"):
        planner.choose("layer-drop", _request(planner.SLO(1.0, 1.0), lat), lat)


def test_orchestrator_runs_the_layer_drop_plan(tmp_path_factory):
    from elastilm.runtime_py.orchestrator import Orchestrator, Request, describe

    out, _ = tiny_build_with_tlm(tmp_path_factory)
    orch = Orchestrator(out, calibrate=False)
    drops = orch.latency.layer_drop.dropped
    most = max(drops.values())
    a = orch.answer(Request("w5 w9 w3", "w11 w12 w13 w14", False, planner.SLO(1.0, 1.0), 5, strategy="layer-drop"))
    assert a.plan.dropped == 0 and a.plan.feasible
    kept = min(drops)  # the synthetic profile's TPOT is 1 + share kept: this budget only fits the fewest layers kept
    a = orch.answer(
        Request(
            "w5 w9 w3",
            "w11 w12 w13 w14",
            False,
            planner.SLO(1.0, (1 + kept) / 2),
            5,
            strategy="layer-drop",
            options=["w7", "w8 w9"],
        )
    )
    assert a.plan.dropped == most and a.plan.feasible and f"{most} layers dropped" in describe(a)
    view = orch.engine.dropped(most)
    assert a.text == "".join(view.stream_text(view.generate_ids(a.compressed.ids, 1.0, 5)))
    assert len(a.option_scores) == 2
