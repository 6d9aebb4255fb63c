"""The layer-dropping baseline (ShortGPT, Men et al. 2024): skip the layers that change the residual stream least.

A layer's Block Influence is BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), where x_i is the residual stream
entering layer i, measured on the same calibration windows as elastify's importance. Dropping the n layers of
lowest BI gives a model with (L - n) / L of the layers; one variant is made per elastic level below 1.0, dropping
as many layers as give the same share of elastic parameters (level 0.5 keeps half of them, so half of the layers
go), so each variant costs about what its elastic level does. `elastilm compile` turns every variant into
functions of the same library (`prefill_drop<n>`, ...) that run the kept layers at full width.

Output: `layer_drop.json` in the elastify folder (formats/layer_drop.py): the scores, the drop order, the variants.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from elastilm.compile import corpus, reference
from elastilm.formats import elastic
from elastilm.formats import layer_drop as layer_drop_file
from elastilm.formats.config import ModelConfig
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.widths import drop_count


@torch.no_grad()
def block_influence(params, cfg: ModelConfig, windows: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """BI (L,) of every layer, averaged over all tokens of `windows` (N, T)."""
    total = torch.zeros(cfg.num_layers, dtype=torch.float64)
    for w in tqdm(windows, desc="block influence", unit="window", disable=not progress):
        stream: list[torch.Tensor] = []
        reference.hidden_states(params, cfg, w[None], residuals=stream)
        for i in range(cfg.num_layers):
            cos = torch.nn.functional.cosine_similarity(stream[i], stream[i + 1], dim=-1)  # (1, T)
            total[i] += (1 - cos.double()).mean()
    return total / len(windows)


def drop_counts(num_layers: int, kept_shares: list[float]) -> list[int]:
    """Layers to drop for each kept share of parameters (at least one layer stays), distinct and ascending."""
    return sorted({n for share in kept_shares if (n := drop_count(num_layers, share)) > 0})


def drop_order(scores: torch.Tensor) -> list[int]:
    """Layers in the order they are dropped: lowest score first (ties: the later layer first)."""
    return sorted(range(len(scores)), key=lambda i: (float(scores[i]), -i))


def plan_drops(scores: torch.Tensor, counts: list[int]) -> dict[int, list[int]]:
    """For each count n, the first n layers of `drop_order`, ascending."""
    order = drop_order(scores)
    return {n: sorted(order[:n]) for n in counts}


def layer_drop(folder: Path, progress: bool = True) -> dict:
    """Score the layers of an elastify folder, choose the variants, write layer_drop.json; returns its content."""
    folder = Path(folder)
    t = time.perf_counter()
    model = elastic.load(folder)
    calib = model.meta.get("calibration")
    if not calib:
        raise ElastiLMError(f"{folder}/elastic.json records no calibration windows; re-run `elastilm elastify`")
    stream = corpus.token_stream(model.tokenizer, calib["part"])
    windows = corpus.random_windows(stream, calib["samples"], calib["seq_len"], calib["seed"])
    scores = block_influence(model.params, model.config, windows, progress)
    counts = drop_counts(model.config.num_layers, [lv.kept for lv in model.levels.values() if lv.fraction < 1])
    doc = {
        "method": "ShortGPT: drop the layers of lowest Block Influence, 1 - cos(layer input, layer output)",
        "calibration": calib,
        "block_influence": [round(float(s), 6) for s in scores],
        "order": drop_order(scores),
        "variants": {str(n): layers for n, layers in plan_drops(scores, counts).items()},
        "seconds": round(time.perf_counter() - t, 1),
    }
    return layer_drop_file.write(folder, doc)
