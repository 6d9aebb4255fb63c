"""The level table: monotone, kernel-friendly, close to its targets, anchors always full."""

import pytest

from elastilm.compile.levels import DEFAULT_FRACTIONS, kept_fraction, level_table
from elastilm.formats.config import ModelConfig
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.widths import layer_widths

SMOLLM2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 1e5, 8192, True)
ODD = ModelConfig("qwen2", 97, 48, 200, 7, 6, 2, 8, 1e-6, 1e4, 64, False)


@pytest.mark.parametrize("cfg,anchors,multiple", [(SMOLLM2, [0, 1, 2, 11, 28, 29], 64), (ODD, [3], 8), (ODD, [], 64)])
def test_level_table_properties(cfg, anchors, multiple):
    levels = level_table(cfg, anchors, DEFAULT_FRACTIONS, multiple)
    table = list(levels.values())
    assert [lv.fraction for lv in table] == list(levels) == list(DEFAULT_FRACTIONS)
    assert levels.full == table[-1] and all(levels[lv.fraction] is lv for lv in table)  # looked up by exact fraction
    assert (table[-1].heads, table[-1].neurons, table[-1].kept) == (cfg.num_heads, cfg.intermediate_size, 1.0)
    for lo, hi in zip(table, table[1:]):
        assert lo.heads <= hi.heads and lo.neurons <= hi.neurons and lo.kept <= hi.kept
    if multiple * 10 <= cfg.intermediate_size:  # fine enough granularity: every level is distinct
        assert len({lv.kept for lv in table}) == len(table)
    floor = kept_fraction(cfg, len(anchors), 1, min(multiple, cfg.intermediate_size))
    for lv in table:
        assert 1 <= lv.heads <= cfg.num_heads
        assert lv.neurons == cfg.intermediate_size or lv.neurons % multiple == 0
        assert lv.kept == pytest.approx(kept_fraction(cfg, len(anchors), lv.heads, lv.neurons))
        # within one rounding step of the target, unless the floor (one head, one block) holds it up
        step = (
            kept_fraction(cfg, 0, 1, multiple) - kept_fraction(cfg, 0, 0, 0)
            if multiple < cfg.intermediate_size
            else 0.2
        )
        assert lv.kept <= max(lv.fraction + step, floor + 1e-9)
        assert lv.kept >= lv.fraction - step
        widths = layer_widths(cfg, anchors, lv)
        assert all(widths[a] == (cfg.num_heads, cfg.intermediate_size) for a in anchors)


def test_smollm2_half_level_is_three_eighths_per_layer():
    """docs/design.md section 2: with 6 of 30 layers anchored, level 50% keeps ~37.5% of each non-anchor layer."""
    lv = level_table(SMOLLM2, list(range(6)))[0.5]
    assert lv.fraction == 0.5 and lv.heads == 3 and lv.neurons == 576  # 3/9 heads ~ 576/1536 neurons = 37.5%


@pytest.mark.parametrize("fractions", [(), (0.0, 0.5), (0.5, 1.2)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ElastiLMError, match="fractions must lie in"):
        level_table(SMOLLM2, [], fractions)
