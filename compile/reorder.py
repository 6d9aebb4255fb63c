"""Permutation-consistent reordering: most important units first, the model's function unchanged.

FFN: neurons sorted by score; gate/up rows and down columns move together.

Attention (GQA): all KV heads stay (the KV cache shape never depends on the level); query heads are elastic
within their KV groups. Query heads are laid out rank-major: new head r*n_kv + k is the r-th best query head
of the k-th KV group, and reads KV head k (the "interleaved" map, j % n_kv). KV groups are ordered by their
best head's score (k/v rows move with them). So any prefix of query heads takes every group's best heads
first, and the active heads are one contiguous prefix of q_proj rows and o_proj columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from elastilm.compile.importance import UnitScores
from elastilm.formats.config import ModelConfig


@dataclass
class Permutation:
    """Per layer, new index -> old index."""

    heads: torch.Tensor  # (L, n_heads)
    kv_heads: torch.Tensor  # (L, n_kv)
    neurons: torch.Tensor  # (L, intermediate)


def head_order(cfg: ModelConfig, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query head order, KV head order) for one layer's head scores (n_heads,)."""
    groups = [[j for j in range(cfg.num_heads) if cfg.kv_head_of(j) == g] for g in range(cfg.num_kv_heads)]
    ranked = [sorted(g, key=lambda j: -scores[j].item()) for g in groups]  # each group, best head first
    kv_order = sorted(range(cfg.num_kv_heads), key=lambda g: -scores[ranked[g][0]].item())
    heads = [ranked[g][r] for r in range(cfg.group_size) for g in kv_order]
    return torch.tensor(heads), torch.tensor(kv_order)


def permutation(cfg: ModelConfig, scores: UnitScores) -> Permutation:
    orders = [head_order(cfg, scores.heads[i]) for i in range(cfg.num_layers)]
    return Permutation(
        heads=torch.stack([h for h, _ in orders]),
        kv_heads=torch.stack([k for _, k in orders]),
        neurons=torch.stack([scores.neurons[i].argsort(descending=True, stable=True) for i in range(cfg.num_layers)]),
    )


def _unit_index(order: torch.Tensor, size: int) -> torch.Tensor:
    """Expand a unit order (n,) to an element order (n*size,) over contiguous blocks of `size`."""
    return (order[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def apply(params, cfg: ModelConfig, perm: Permutation) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Reordered copy of `params` and its config (interleaved KV map). Same function as the original."""
    out = dict(params)
    hd = cfg.head_dim

    def take(name, index, dim):
        for suffix in (".weight", ".bias"):
            key = name + suffix
            if key in out and (suffix == ".weight" or dim == 0):
                out[key] = out[key].index_select(dim, index).contiguous()

    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q_index = _unit_index(perm.heads[i], hd)
        kv_index = _unit_index(perm.kv_heads[i], hd)
        take(a + "q_proj", q_index, 0)
        take(a + "o_proj", q_index, 1)
        take(a + "k_proj", kv_index, 0)
        take(a + "v_proj", kv_index, 0)
        take(m + "gate_proj", perm.neurons[i], 0)
        take(m + "up_proj", perm.neurons[i], 0)
        take(m + "down_proj", perm.neurons[i], 1)
    return out, replace(cfg, kv_head_map="interleaved")
