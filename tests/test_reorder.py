"""Reordering is permutation-consistent: same function, best units first, GQA groups respected."""

import pytest
import torch
from conftest import random_ids, tiny_model

from elastilm.compile import importance, reference, reorder
from elastilm.compile.importance import UnitScores


def random_scores(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return UnitScores(
        torch.rand(cfg.num_layers, cfg.num_heads, generator=g),
        torch.rand(cfg.num_layers, cfg.intermediate_size, generator=g),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_reordered_model_is_the_same_function(tiny, seed):
    _, params, cfg = tiny
    new_params, new_cfg = reorder.apply(params, cfg, reorder.permutation(cfg, random_scores(cfg, seed)))
    assert new_cfg.kv_head_map == "interleaved"
    assert any(not torch.equal(new_params[k], params[k]) for k in params)  # something moved
    ids = random_ids(cfg, length=13, seed=seed)
    diff = reference.logits(new_params, new_cfg, ids) - reference.logits(params, cfg, ids)
    assert diff.abs().max() < 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_every_head_prefix_takes_each_groups_best_heads(seed):
    _, _, cfg = tiny_model("llama")  # 6 query heads in 2 KV groups
    scores = random_scores(cfg, seed).heads[0]
    heads, kv_order = reorder.head_order(cfg, scores)
    assert sorted(heads.tolist()) == list(range(cfg.num_heads))
    for p, old in enumerate(heads.tolist()):  # new head p reads new KV head p % n_kv = old KV head kv_order[p % n_kv]
        assert cfg.kv_head_of(old) == kv_order[p % cfg.num_kv_heads]
    for prefix in range(1, cfg.num_heads + 1):
        chosen = heads[:prefix].tolist()
        per_group = [[j for j in chosen if cfg.kv_head_of(j) == g] for g in range(cfg.num_kv_heads)]
        assert max(map(len, per_group)) - min(map(len, per_group)) <= 1
        for g, picked in enumerate(per_group):
            members = sorted((j for j in range(cfg.num_heads) if cfg.kv_head_of(j) == g), key=lambda j: -scores[j])
            assert picked == members[: len(picked)]


def test_importance_follows_the_units_and_ends_sorted():
    """Taylor scores are permutation-equivariant, so scoring the reordered model gives the sorted scores."""
    _, params, cfg = tiny_model("qwen2")
    windows = random_ids(cfg, batch=3, length=12, seed=5)
    before = importance.taylor_scores(params, cfg, windows, progress=False)
    perm = reorder.permutation(cfg, before)
    new_params, new_cfg = reorder.apply(params, cfg, perm)
    after = importance.taylor_scores(new_params, new_cfg, windows, progress=False)
    for i in range(cfg.num_layers):
        torch.testing.assert_close(after.neurons[i], before.neurons[i][perm.neurons[i]], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(after.heads[i], before.heads[i][perm.heads[i]], rtol=1e-4, atol=1e-6)
        assert torch.all(after.neurons[i][:-1] >= after.neurons[i][1:] - 1e-6)
