"""Torch reference forward of a Llama-family model at any per-layer width (prefix slicing).

This is the oracle: compiled kernels are checked against it. It reads the full-width weights and uses only the
first `heads` query heads (q_proj rows, o_proj columns) and the first `neurons` FFN neurons (gate/up rows,
down_proj columns) of each layer; KV heads always stay whole. Width (0, 0) skips the layer's two blocks.
Weights use Hugging Face tensor names; optional biases are used when present. It computes in the weights' dtype:
fp32 as served, or fp64 to get the exact function that fp32 evaluations approximate.

`adapters` (optional) maps a projection name (e.g. "model.layers.3.mlp.up_proj") to a LoRA pair (A (r, in),
B (out, r)), full-width like the weights and sliced the same way, so the update a level sees is
B[:rows] @ A[:, :cols]; the LoRA scale is already folded into B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from elastilm.formats.config import ModelConfig

Widths = Sequence[tuple[int, int]]  # per layer: (active query heads, active FFN neurons)


def full_widths(cfg: ModelConfig) -> list[tuple[int, int]]:
    return [(cfg.num_heads, cfg.intermediate_size)] * cfg.num_layers


def _linear(x, params, name, rows=None, cols=None, adapters=None):
    """x @ W[:rows, :cols]^T (+ b[:rows]) (+ the LoRA update on the same prefix): views, never copies."""
    w = params[name + ".weight"]
    w = w[:rows] if rows is not None else w
    w = w[:, :cols] if cols is not None else w
    b = params.get(name + ".bias")
    if b is not None and rows is not None:
        b = b[:rows]
    y = F.linear(x, w, b)
    lora = adapters.get(name) if adapters else None
    if lora is not None:
        a, bb = lora
        y = y + F.linear(F.linear(x, a[:, :cols] if cols is not None else a), bb[:rows] if rows is not None else bb)
    return y


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (T, hd) computed in `dtype` (fp32 as the compiled kernels and transformers do; fp64 for truth)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=dtype) / cfg.head_dim))
    freqs = positions.to(dtype)[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def _apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention(x, params, cfg: ModelConfig, prefix: str, heads: int, cos, sin, adapters=None):
    B, T, _ = x.shape
    hd = cfg.head_dim
    q = _linear(x, params, prefix + "q_proj", rows=heads * hd, adapters=adapters)  # (B, T, heads*hd)
    k = _linear(x, params, prefix + "k_proj", adapters=adapters)  # (B, T, n_kv*hd)
    v = _linear(x, params, prefix + "v_proj", adapters=adapters)
    q = q.view(B, T, heads, hd).transpose(1, 2)  # (B, heads, T, hd)
    k = k.view(B, T, cfg.num_kv_heads, hd).transpose(1, 2)  # (B, n_kv, T, hd)
    v = v.view(B, T, cfg.num_kv_heads, hd).transpose(1, 2)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    kv = torch.tensor([cfg.kv_head_of(j) for j in range(heads)], dtype=torch.long)
    k, v = k[:, kv], v[:, kv]  # (B, heads, T, hd): each active query head with its KV head
    scores = (q @ k.transpose(-1, -2)) / hd**0.5  # (B, heads, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    y = scores.softmax(-1) @ v  # (B, heads, T, hd)
    y = y.transpose(1, 2).reshape(B, T, heads * hd)
    return _linear(y, params, prefix + "o_proj", cols=heads * hd, adapters=adapters)  # (B, T, hidden)


def _ffn(x, params, prefix: str, neurons: int, adapters=None):
    h = F.silu(_linear(x, params, prefix + "gate_proj", rows=neurons, adapters=adapters)) * _linear(
        x, params, prefix + "up_proj", rows=neurons, adapters=adapters
    )  # (B, T, neurons)
    return _linear(h, params, prefix + "down_proj", cols=neurons, adapters=adapters)


def hidden_states(
    params, cfg: ModelConfig, input_ids: torch.Tensor, widths: Widths | None = None, adapters=None, residuals=None
):
    """Final-norm hidden states (B, T, hidden) of `input_ids` (B, T) at the given per-layer widths. A list
    `residuals` receives the residual stream before every layer and after the last (L + 1 tensors)."""
    widths = full_widths(cfg) if widths is None else widths
    if len(widths) != cfg.num_layers:
        raise ValueError(f"widths has {len(widths)} layers, model has {cfg.num_layers}")
    x = F.embedding(input_ids, params["model.embed_tokens.weight"])  # (B, T, hidden)
    cos, sin = _rope(cfg, torch.arange(input_ids.shape[1]), x.dtype)
    for i, (heads, neurons) in enumerate(widths):
        p = f"model.layers.{i}."
        if residuals is not None:
            residuals.append(x)
        if heads:
            h = _rms_norm(x, params[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            x = x + _attention(h, params, cfg, p + "self_attn.", heads, cos, sin, adapters)
        if neurons:
            h = _rms_norm(x, params[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            x = x + _ffn(h, params, p + "mlp.", neurons, adapters)
    if residuals is not None:
        residuals.append(x)
    return _rms_norm(x, params["model.norm.weight"], cfg.rms_norm_eps)


def lm_head_weight(params, cfg: ModelConfig) -> torch.Tensor:
    return params["model.embed_tokens.weight"] if cfg.tie_word_embeddings else params["lm_head.weight"]


def logits(
    params, cfg: ModelConfig, input_ids: torch.Tensor, widths: Widths | None = None, adapters=None
) -> torch.Tensor:
    """Logits (B, T, vocab) at the given per-layer widths (with a level's LoRA adapters when given)."""
    return hidden_states(params, cfg, input_ids, widths, adapters) @ lm_head_weight(params, cfg).T


def next_token_loss(params, cfg: ModelConfig, input_ids: torch.Tensor, widths: Widths | None = None, adapters=None):
    """Mean next-token cross-entropy over (B, T) windows."""
    out = logits(params, cfg, input_ids, widths, adapters)
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), input_ids[:, 1:].reshape(-1))
