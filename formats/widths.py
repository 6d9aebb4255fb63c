"""The width contract: what one level runs at, looked up by its fraction exactly.

A level is a share of the elastic parameters (`fraction`, e.g. 0.5). Fractions are the doubles nearest their
decimal text (0.5, 0.7) everywhere: parsed from the command line, read from JSON, or rounded to one decimal when
the table is made, so a level is found by exact equality, never by a tolerance.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass

from elastilm.formats.config import ModelConfig
from elastilm.formats.errors import ElastiLMError


@dataclass(frozen=True)
class Level:
    fraction: float  # requested share of elastic parameters: the level's key
    heads: int  # active query heads per non-anchor layer
    neurons: int  # active FFN neurons per non-anchor layer
    kept: float  # achieved share of elastic parameters (at least `fraction` at the lowest levels)

    def neuron_blocks(self, block: int) -> int:
        """The neuron width as the kernels take it: whole blocks of `block` neurons."""
        if self.neurons % block:
            raise ElastiLMError(f"level {self.fraction:g}: {self.neurons} neurons are not whole blocks of {block}")
        return self.neurons // block

    def to_dict(self) -> dict:
        return asdict(self)


class LevelTable(Mapping[float, Level]):
    """Levels by fraction, ascending; `table[f]` is exact and names the valid levels when `f` is not one."""

    def __init__(self, levels: Iterable[Level]):
        self._levels = {lv.fraction: lv for lv in sorted(levels, key=lambda lv: lv.fraction)}

    @classmethod
    def from_dicts(cls, rows: Iterable[dict]) -> LevelTable:
        return cls(Level(**row) for row in rows)

    def __getitem__(self, fraction: float) -> Level:
        try:
            return self._levels[fraction]
        except (KeyError, TypeError):
            raise ElastiLMError(
                f"unknown level {fraction!r}; valid levels are {', '.join(f'{f:g}' for f in self)}"
            ) from None

    def __iter__(self) -> Iterator[float]:
        return iter(self._levels)

    def __len__(self) -> int:
        return len(self._levels)

    @property
    def full(self) -> Level:
        return self._levels[max(self._levels)]

    def to_dicts(self) -> list[dict]:
        return [lv.to_dict() for lv in self.values()]


def drop_count(num_layers: int, kept_share: float) -> int:
    """Layers the layer-dropping baseline drops to keep `kept_share` of the parameters (at least one layer stays)."""
    return min(num_layers - 1, round((1 - kept_share) * num_layers))


def layer_widths(cfg: ModelConfig, anchors, level: Level) -> list[tuple[int, int]]:
    """Per-layer (active query heads, active FFN neurons) at `level`: anchors full, the rest at the level's width."""
    full = (cfg.num_heads, cfg.intermediate_size)
    return [full if i in anchors else (level.heads, level.neurons) for i in range(cfg.num_layers)]
