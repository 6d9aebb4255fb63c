"""The level table: for each level, the active query heads and FFN neurons of every non-anchor layer.

A level is a fraction of the elastic parameters (q_proj/o_proj per head, gate/up/down per neuron, over all
layers). Anchor layers stay full, so the non-anchor layers carry the whole reduction: with 6 anchors out of 30,
level 0.5 keeps (0.5*30 - 6)/24 = 37.5% of each non-anchor layer. Neurons come in multiples of
`neuron_multiple` (whole vector blocks for the kernels); every non-anchor layer keeps at least one query head and one
block of neurons, so the lowest level can sit above its target (`kept` says by how much).
"""

from __future__ import annotations

from elastilm.formats.config import ModelConfig
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.widths import Level, LevelTable

DEFAULT_FRACTIONS = tuple(round(0.1 * k, 1) for k in range(2, 11))  # 0.2 .. 1.0


def head_params(cfg: ModelConfig) -> int:
    return 2 * cfg.head_dim * cfg.hidden_size  # q_proj rows + o_proj columns


def neuron_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size  # gate row + up row + down column


def kept_fraction(cfg: ModelConfig, n_anchors: int, heads: int, neurons: int) -> float:
    full = cfg.num_heads * head_params(cfg) + cfg.intermediate_size * neuron_params(cfg)
    layer = heads * head_params(cfg) + neurons * neuron_params(cfg)
    return (n_anchors * full + (cfg.num_layers - n_anchors) * layer) / (cfg.num_layers * full)


def level_table(
    cfg: ModelConfig, anchors: list[int], fractions=DEFAULT_FRACTIONS, neuron_multiple: int = 64
) -> LevelTable:
    """One `Level` per fraction, ascending."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ElastiLMError(f"level fractions must lie in (0, 1], got {list(fractions)}")
    if neuron_multiple < 1:
        raise ElastiLMError(f"neuron_multiple must be positive, got {neuron_multiple}")
    n_elastic = cfg.num_layers - len(anchors)
    full = cfg.num_heads * head_params(cfg) + cfg.intermediate_size * neuron_params(cfg)
    block = min(neuron_multiple, cfg.intermediate_size)
    levels = []
    for f in sorted(fractions):
        if f == 1.0 or n_elastic == 0:
            heads, neurons = cfg.num_heads, cfg.intermediate_size
        else:
            budget = (f * cfg.num_layers - len(anchors)) * full / n_elastic  # per non-anchor layer
            share = max(budget, 0.0) / full
            heads = min(cfg.num_heads, max(1, round(share * cfg.num_heads)))
            rest = (budget - heads * head_params(cfg)) / neuron_params(cfg)
            neurons = min(cfg.intermediate_size, max(block, round(rest / block) * block))
        levels.append(Level(f, heads, neurons, kept_fraction(cfg, len(anchors), heads, neurons)))
    return LevelTable(levels)
