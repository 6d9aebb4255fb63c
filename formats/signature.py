"""The compiled library's functions and their arguments, named once: compile/export.py declares its methods
from these names and runtime_py/engine.py calls them through `arguments`, so the two cannot drift apart by
position.

  embed(input_ids (T,) int32) -> embeddings (T, d)
  prefill | decode | score (ARGUMENTS..., params) -> (logits, caches)

ARGUMENTS, in call order:
  embeddings     (T, d) float32; decode: T = 1
  caches         two per layer: K transposed (n_kv*hd, cache_rows) and V (cache_rows, n_kv*hd), written in place
  adapters       two per projection and layer: LoRA A (r, in) and B^T in strips (out/strip, r, strip) of the
                 level (rank 0, or all zeros: none); the rank is the second-to-last axis of both
  past           positions already in the cache
  heads          active query heads of non-anchor layers
  neuron_blocks  active FFN neurons of non-anchor layers, in whole blocks (manifest "neuron_block")
then the packed parameters, in manifest "param_names" order. `prefill` and `decode` return the logits of the last
position (1, vocab), `score` of every position (T, vocab). The layer-dropping baseline adds `<method>_drop<n>`
with the same arguments.
"""

from __future__ import annotations

from elastilm.formats.errors import ElastiLMError

EMBED = "embed"
METHODS = ("prefill", "decode", "score")
ARGUMENTS = ("embeddings", "caches", "adapters", "past", "heads", "neuron_blocks")
# symbolic extents of the library (seq_len: T; lora_rank: the rank of the adapter set passed, 0 for none)
SYMBOLIC = ("seq_len", "past", "heads", "neuron_blocks", "lora_rank")


def function_name(method: str, dropped: int = 0) -> str:
    """The library function of `method` with `dropped` layers skipped (0: the elastic model itself)."""
    if method not in METHODS:
        raise ElastiLMError(f"unknown model function '{method}'; known: {', '.join(METHODS)}")
    return f"{method}_drop{dropped}" if dropped else method


def function_names(drops) -> list[str]:
    """Every function of a library with the layer-drop variants `drops` (layer counts)."""
    return [EMBED, *METHODS] + [function_name(m, n) for n in drops for m in METHODS]


def with_rank(shape, rank) -> tuple:
    """An adapter input's shape (manifest "adapter_shapes") at another rank: its second-to-last axis."""
    shape = tuple(shape)
    return (*shape[:-2], rank, shape[-1])


def arguments(**values) -> tuple:
    """`values` (every name of ARGUMENTS, no other) as positional arguments in call order."""
    if set(values) != set(ARGUMENTS):
        raise TypeError(f"model functions take {ARGUMENTS}, got {tuple(values)}")
    return tuple(values[name] for name in ARGUMENTS)
