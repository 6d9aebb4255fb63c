"""Group quantization of linear weights (and of the embedding table, whose rows are the LM head's outputs) into
the packed strip layout the quantized kernels read (numpy).

A linear weight W (out, in) becomes, with strips of `s` output rows (elastic_ops.prefix.strip_width) and a format
of `b` bits, `p` = 32 / b weights per word and groups of `g` inputs (formats/quant.py):

  q        (out/s, in/p, s) uint32  word [j, w, i] holds inputs w*p .. w*p + p-1 of output row j*s + i, the
                                    lowest bits first
  scale    (out/s, in/g, s) float32 scale [j, c, i] of inputs c*g .. c*g + g-1 of output row j*s + i; uint16
                                    holding fp16 bits in a `half` format (the levels are computed with the
                                    rounded scale, so the rounding costs at most the half step it always had)
  minimum  (out/s, in/g, s) float32 likewise, asymmetric formats only

As in the fp32 strip layout, the active outputs of a level are its first strips and the active inputs the first
rows of each strip (in/p words, in/g scales), so a level reads one contiguous prefix of both, never a copy; the
active input width must be a whole number of groups.
"""

from __future__ import annotations

import numpy as np

from elastilm.elastic_ops.prefix import strip_width
from elastilm.formats.config import ModelConfig, projection_names
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.quant import Format, Scheme

PARTS = ("q_weight", "q_scale", "q_min")  # the library's names of a quantized weight's arrays, in `quantize` order


def quantized_names(cfg: ModelConfig) -> list[str]:
    """The checkpoint weights a quantized build stores quantized: every linear layer's and the embedding table's
    (the LM head's too when it is not tied)."""
    tables = ["model.embed_tokens"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
    return [n + ".weight" for n in projection_names(cfg) + tables]


def simulated(params: dict, cfg: ModelConfig, scheme: Scheme) -> dict:
    """The parameters (torch tensors) as a build with `scheme` computes with them: each quantized weight replaced
    by its dequantized packed form, for the torch reference (recovery against the quantized base, quality per
    scheme). The same dict for an fp32 scheme."""
    import torch

    if not scheme.quantized:
        return params
    out = dict(params)
    for name in quantized_names(cfg):
        w, fmt = params[name], scheme.format(name)
        deq = dequantize(quantize(w.detach().cpu().numpy(), fmt), fmt)
        out[name] = torch.from_numpy(deq).to(w.device)
    return out


def stored_adapter(a: np.ndarray, scheme: Scheme, name: str) -> np.ndarray:
    """An adapter tensor as the library stores it under `scheme`: fp32, or fp16 bits (uint16); one that fp16
    cannot hold is refused rather than stored as infinities."""
    if not scheme.half_adapters:
        return a.astype(np.float32)
    half = a.astype(np.float16)
    if not np.isfinite(half).all():
        raise ElastiLMError(
            f"adapter {name} has entries beyond fp16's range (largest |value| {np.abs(a).max():.3g}), which "
            f"{scheme.name} stores in fp16; compile it with --quant q4f32_1 or q0f32, or retrain it"
        )
    return half.view(np.uint16)


def simulated_adapters(adapters: dict, scheme: Scheme) -> dict:
    """A level's adapters {projection: (A, B)} (torch) as a build with `scheme` computes with them: rounded to
    fp16 where it stores them so (the torch reference beside `simulated`)."""
    import torch

    if not scheme.half_adapters or not adapters:
        return adapters
    return {name: tuple(t.to(torch.float16).to(t.dtype) for t in pair) for name, pair in adapters.items()}


def quantize(w: np.ndarray, fmt: Format) -> tuple[np.ndarray, ...]:
    """(q, scale), or (q, scale, minimum) for an asymmetric format, of `w` (out, in) in the packed strip layout."""
    rows, cols = w.shape
    g, p = fmt.group, fmt.per_word
    if cols % g:
        raise ValueError(f"{cols} inputs are not whole groups of {g}")
    w = w.astype(np.float64).reshape(rows, cols // g, g)
    if fmt.asymmetric:
        low = w.min(-1)
        step = (w.max(-1) - low) / fmt.top  # (out, in/g)
    else:
        low = None
        step = np.abs(w).max(-1) / fmt.qmax
    scale = np.where(step > 0, step, 1.0).astype(np.float32)
    if fmt.half:  # a step below fp16's smallest subnormal would round to 0
        scale = np.maximum(scale.astype(np.float16), np.float16(2**-24))
        low = None if low is None else low.astype(np.float16)
    shifted = w - low[..., None].astype(np.float64) if fmt.asymmetric else w
    q = np.rint(shifted / scale[..., None].astype(np.float64)) + (0 if fmt.asymmetric else fmt.qmax)
    q = np.clip(q, 0, fmt.top).astype(np.uint32).reshape(rows, cols // p, p)
    words = np.zeros((rows, cols // p), np.uint32)
    for n in range(p):
        words |= q[..., n] << np.uint32(n * fmt.bits)
    s = strip_width(rows)
    stored = np.float16 if fmt.half else np.float32
    groups = (scale,) if low is None else (scale, low)
    groups = tuple(g.astype(stored).view(fmt.scale_dtype) for g in groups)
    return tuple(np.ascontiguousarray(strips(a, s)) for a in (words, *groups))


def dequantize(packed: tuple[np.ndarray, ...], fmt: Format) -> np.ndarray:
    """W (out, in) float32 back from the packed strip layout `quantize` returns (the reference the kernels are
    checked against)."""
    words, scales = _rows(packed[0]), _values(_rows(packed[1]))  # (out, in/p), (out, in/g)
    mask = np.uint32((1 << fmt.bits) - 1)
    levels = np.stack([(words >> np.uint32(n * fmt.bits)) & mask for n in range(fmt.per_word)], -1)
    levels = levels.reshape(words.shape[0], -1).astype(np.float32)  # (out, in)
    if fmt.asymmetric:
        return levels * np.repeat(scales, fmt.group, axis=1) + np.repeat(_values(_rows(packed[2])), fmt.group, axis=1)
    return (levels - fmt.qmax) * np.repeat(scales, fmt.group, axis=1)


def strips(a, s: int):
    """(out, n) -> (out/s, n, s): strip j holds rows j*s .. j*s + s-1, the n columns input-major (a view; torch
    or numpy)."""
    rows, n = a.shape
    return a.reshape(rows // s, s, n).swapaxes(1, 2)


def _values(a: np.ndarray) -> np.ndarray:
    """Stored scales or minima as float32 (uint16: fp16 bit patterns)."""
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


def _rows(a: np.ndarray) -> np.ndarray:
    """(out/s, n, s) -> (out, n)."""
    strips, n, s = a.shape
    return a.swapaxes(1, 2).reshape(strips * s, n)
