"""The torch oracle equals transformers: at full width, at prefix widths, and with layers skipped."""

import copy

import pytest
import torch
from conftest import random_ids, tiny_model

from elastilm.compile import reference, reorder
from elastilm.compile.importance import UnitScores


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False).logits


def masked_copy(hf, cfg, active_heads, active_neurons):
    """A transformers model whose inactive units are silenced by zeroing their output columns.

    Zeroing o_proj columns of a head (down_proj column of a neuron) removes exactly that unit's contribution,
    which is what reading only the active prefix must compute.
    """
    m = copy.deepcopy(hf)
    hd = cfg.head_dim
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            for h in set(range(cfg.num_heads)) - set(active_heads[i]):
                layer.self_attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
            for n in set(range(cfg.intermediate_size)) - set(active_neurons[i]):
                layer.mlp.down_proj.weight[:, n] = 0
    return m


def random_widths(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            int(torch.randint(1, cfg.num_heads + 1, (1,), generator=g)),
            int(torch.randint(1, cfg.intermediate_size + 1, (1,), generator=g)),
        )
        for _ in range(cfg.num_layers)
    ]


def test_full_width_matches_transformers(tiny):
    hf, params, cfg = tiny
    ids = random_ids(cfg)
    expected = hf_logits(hf, ids)
    assert expected.std() > 0.5  # a model whose logits carry signal
    got = reference.logits(params, cfg, ids)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_widths_match_masked_transformers(tiny, seed):
    hf, params, cfg = tiny
    widths = random_widths(cfg, seed)
    ids = random_ids(cfg, seed=seed)
    expected = hf_logits(masked_copy(hf, cfg, [range(h) for h, _ in widths], [range(n) for _, n in widths]), ids)
    got = reference.logits(params, cfg, ids, widths)
    assert (got - expected).abs().max() < 1e-4
    # and the prefix really changes the function (the comparison is not vacuous)
    assert (got - hf_logits(hf, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 3])
def test_prefix_of_reordered_model_is_the_chosen_units(tiny, seed):
    """A prefix of the reordered (interleaved-KV) model keeps exactly the top-ranked original units."""
    hf, params, cfg = tiny
    g = torch.Generator().manual_seed(seed)
    scores = UnitScores(
        torch.rand(cfg.num_layers, cfg.num_heads, generator=g),
        torch.rand(cfg.num_layers, cfg.intermediate_size, generator=g),
    )
    perm = reorder.permutation(cfg, scores)
    new_params, new_cfg = reorder.apply(params, cfg, perm)
    widths = random_widths(new_cfg, seed + 10)
    heads = [perm.heads[i][:h].tolist() for i, (h, _) in enumerate(widths)]
    neurons = [perm.neurons[i][:n].tolist() for i, (_, n) in enumerate(widths)]
    ids = random_ids(cfg, seed=seed)
    expected = hf_logits(masked_copy(hf, cfg, heads, neurons), ids)
    got = reference.logits(new_params, new_cfg, ids, widths)
    assert (got - expected).abs().max() < 1e-4


def test_zero_width_skips_the_layer():
    hf, params, cfg = tiny_model("llama-untied-bias")
    ids = random_ids(cfg)
    widths = reference.full_widths(cfg)
    widths[2] = (0, 0)
    skipped = copy.deepcopy(hf)
    del skipped.model.layers[2]
    expected = hf_logits(skipped, ids)
    assert (reference.logits(params, cfg, ids, widths) - expected).abs().max() < 1e-4


def test_wrong_number_of_layer_widths_is_refused():
    _, params, cfg = tiny_model("llama")
    with pytest.raises(ValueError, match="widths has 3 layers"):
        reference.logits(params, cfg, random_ids(cfg), [(1, 1)] * 3)
