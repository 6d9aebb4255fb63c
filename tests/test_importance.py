"""Importance scores equal the definition, computed independently through transformers autograd."""

import copy

import torch
from conftest import random_ids, tiny_model

from elastilm.compile import importance


def test_taylor_scores_match_transformers_autograd():
    hf, params, cfg = tiny_model("llama-untied-bias")
    windows = random_ids(cfg, batch=3, length=10, seed=2)
    got = importance.taylor_scores(params, cfg, windows, progress=False)

    saliency = {}
    for w in windows:
        hf.zero_grad()
        hf(input_ids=w[None], labels=w[None], use_cache=False).loss.backward()
        for name, p in hf.named_parameters():
            saliency[name] = saliency.get(name, 0) + (p.grad * p.detach()).abs()
    hd = cfg.head_dim
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for h in range(cfg.num_heads):
            rows = slice(h * hd, (h + 1) * hd)
            expected = (
                saliency[a + "q_proj.weight"][rows].sum()
                + saliency[a + "q_proj.bias"][rows].sum()
                + saliency[a + "o_proj.weight"][:, rows].sum()
            )
            torch.testing.assert_close(got.heads[i, h], expected, rtol=1e-4, atol=1e-7)
        for n in range(cfg.intermediate_size):
            expected = (
                saliency[m + "gate_proj.weight"][n].sum()
                + saliency[m + "up_proj.weight"][n].sum()
                + saliency[m + "down_proj.weight"][:, n].sum()
                + saliency[m + "gate_proj.bias"][n]
                + saliency[m + "up_proj.bias"][n]
            )
            torch.testing.assert_close(got.neurons[i, n], expected, rtol=1e-4, atol=1e-7)


def test_layer_skip_scores_match_removing_the_layer():
    hf, params, cfg = tiny_model("qwen2")
    windows = random_ids(cfg, batch=2, length=12, seed=3)
    got = importance.layer_skip_scores(params, cfg, windows, progress=False)
    with torch.no_grad():
        base = hf(input_ids=windows, labels=windows, use_cache=False).loss
        for i in range(cfg.num_layers):
            m = copy.deepcopy(hf)
            del m.model.layers[i]
            rise = m(input_ids=windows, labels=windows, use_cache=False).loss - base
            torch.testing.assert_close(got[i], rise, rtol=1e-4, atol=1e-5)


def test_anchor_layers_are_the_costliest_to_skip():
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.2, 9.0, 0.3, 0.4, 0.6, 1.0])
    assert importance.anchor_layers(scores, 0.2) == [1, 5]
    assert importance.anchor_layers(scores, 0.3) == [1, 3, 5]
    assert importance.anchor_layers(scores, 0.0) == []
