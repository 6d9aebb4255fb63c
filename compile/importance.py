"""Importance of every elastic unit and of every layer, measured on calibration windows.

Units: a query head (its q_proj rows and bias, its o_proj columns) and an FFN neuron (its gate_proj and up_proj
rows, its down_proj column). A unit's score is the first-order Taylor estimate of the loss change when it is
removed: sum over its weights of |dL/dW * W|, accumulated over calibration windows one at a time.
A layer's score is how much the loss rises when the layer is skipped (both of its residual blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from elastilm.compile import reference
from elastilm.formats.config import ModelConfig


@dataclass
class UnitScores:
    heads: torch.Tensor  # (L, n_heads)
    neurons: torch.Tensor  # (L, intermediate)


def _elastic_names(i: int) -> list[str]:
    p = f"model.layers.{i}."
    return [p + s for s in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def unit_scores_from_saliency(cfg: ModelConfig, saliency: dict[str, torch.Tensor], i: int):
    """Sum element saliencies |g*w| of layer i into per-head (n_heads,) and per-neuron (intermediate,) scores."""
    hd, H = cfg.head_dim, cfg.num_heads
    p = f"model.layers.{i}."
    heads = saliency[p + "self_attn.q_proj.weight"].view(H, hd, -1).sum((1, 2))
    heads = heads + saliency[p + "self_attn.o_proj.weight"].view(-1, H, hd).sum((0, 2))
    if p + "self_attn.q_proj.bias" in saliency:
        heads = heads + saliency[p + "self_attn.q_proj.bias"].view(H, hd).sum(1)
    neurons = saliency[p + "mlp.gate_proj.weight"].sum(1) + saliency[p + "mlp.up_proj.weight"].sum(1)
    neurons = neurons + saliency[p + "mlp.down_proj.weight"].sum(0)
    for b in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
        if p + b in saliency:
            neurons = neurons + saliency[p + b]
    return heads, neurons


def taylor_scores(params, cfg: ModelConfig, windows: torch.Tensor, progress: bool = True) -> UnitScores:
    """First-order Taylor importance of every query head and FFN neuron over `windows` (N, T)."""
    names = [
        n
        for i in range(cfg.num_layers)
        for base in _elastic_names(i)
        for n in (base + ".weight", base + ".bias")
        if n in params
    ]
    leaves = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    model = {**params, **leaves}
    saliency = {n: torch.zeros_like(t) for n, t in leaves.items()}
    for w in tqdm(windows, desc="importance (Taylor)", unit="window", disable=not progress):
        loss = reference.next_token_loss(model, cfg, w[None])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for (n, leaf), g in zip(leaves.items(), grads):
            saliency[n] += (g * leaf.detach()).abs()
    heads, neurons = zip(*(unit_scores_from_saliency(cfg, saliency, i) for i in range(cfg.num_layers)))
    return UnitScores(heads=torch.stack(heads), neurons=torch.stack(neurons))


@torch.no_grad()
def layer_skip_scores(params, cfg: ModelConfig, windows: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """Loss increase (L,) on `windows` when each layer alone is skipped."""
    base = reference.next_token_loss(params, cfg, windows).item()
    full = reference.full_widths(cfg)
    rises = []
    for i in tqdm(range(cfg.num_layers), desc="importance (layer skip)", unit="layer", disable=not progress):
        widths = list(full)
        widths[i] = (0, 0)
        rises.append(reference.next_token_loss(params, cfg, windows, widths).item() - base)
    return torch.tensor(rises)


def anchor_layers(layer_scores: torch.Tensor, fraction: float) -> list[int]:
    """The round(fraction * L) layers whose skipping raises the loss most, ascending."""
    count = round(fraction * len(layer_scores))
    return sorted(layer_scores.argsort(descending=True)[:count].tolist())
