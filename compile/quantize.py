"""Group quantization of linear weights (and of the embedding table, whose rows are the LM head's outputs) into
the packed strip layout the quantized kernels read (numpy).

A linear weight W (out, in) becomes, with strips of `s` output rows (elastic_ops.prefix.strip_width) and a scheme
of `b` bits, `p` = 32 / b weights per word and groups of `g` inputs (formats/quant.py):

  q      (out/s, in/p, s) uint32  word [j, w, i] holds inputs w*p .. w*p + p-1 of output row j*s + i, the lowest
                                  bits first
  scale  (out/s, in/g, s) float32 scale [j, c, i] of inputs c*g .. c*g + g-1 of output row j*s + i

As in the fp32 strip layout, the active outputs of a level are its first strips and the active inputs the first
rows of each strip (in/p words, in/g scales), so a level reads one contiguous prefix of both, never a copy; the
active input width must be a whole number of groups.
"""

from __future__ import annotations

import numpy as np

from elastilm.elastic_ops.prefix import strip_width
from elastilm.formats.config import ModelConfig, projection_names
from elastilm.formats.quant import Scheme


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
        w = params[name]
        deq = dequantize(*quantize(w.detach().cpu().numpy(), scheme), scheme)
        out[name] = torch.from_numpy(deq).to(w.device)
    return out


def quantize(w: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) of `w` (out, in) in the packed strip layout."""
    rows, cols = w.shape
    g, p, qmax = scheme.group, scheme.per_word, scheme.qmax
    if cols % g:
        raise ValueError(f"{cols} inputs are not whole groups of {g}")
    w = w.astype(np.float64).reshape(rows, cols // g, g)
    scale = np.abs(w).max(-1) / qmax  # (out, in/g)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None].astype(np.float64)) + qmax, 0, 2 * qmax).astype(np.uint32)
    q = q.reshape(rows, cols // p, p)
    words = np.zeros((rows, cols // p), np.uint32)
    for n in range(p):
        words |= q[..., n] << np.uint32(n * scheme.bits)
    s = strip_width(rows)
    return np.ascontiguousarray(strips(words, s)), np.ascontiguousarray(strips(scale, s))


def dequantize(q: np.ndarray, scale: np.ndarray, scheme: Scheme) -> np.ndarray:
    """W (out, in) float32 back from the packed strip layout (the reference the kernels are checked against)."""
    words, scales = _rows(q), _rows(scale)  # (out, in/p), (out, in/g)
    mask = np.uint32((1 << scheme.bits) - 1)
    values = np.stack([(words >> np.uint32(n * scheme.bits)) & mask for n in range(scheme.per_word)], -1)
    values = values.reshape(words.shape[0], -1).astype(np.float32) - scheme.qmax  # (out, in)
    return values * np.repeat(scales, scheme.group, axis=1)


def strips(a, s: int):
    """(out, n) -> (out/s, n, s): strip j holds rows j*s .. j*s + s-1, the n columns input-major (a view; torch
    or numpy)."""
    rows, n = a.shape
    return a.reshape(rows // s, s, n).swapaxes(1, 2)


def _rows(a: np.ndarray) -> np.ndarray:
    """(out/s, n, s) -> (out, n)."""
    strips, n, s = a.shape
    return a.swapaxes(1, 2).reshape(strips * s, n)
