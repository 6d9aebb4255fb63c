"""One-shot elastification: ingest -> importance -> anchors -> reorder -> levels -> the elastify folder
(formats/elastic.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from elastilm.compile import corpus, importance, ingest, levels, reorder
from elastilm.formats import elastic


@dataclass(frozen=True)
class ElastifyOptions:
    calib_samples: int = 10  # the paper's 10 x 64 tokens
    calib_seq_len: int = 64
    seed: int = 0
    anchor_fraction: float = 0.2
    neuron_multiple: int = 64
    fractions: tuple[float, ...] = levels.DEFAULT_FRACTIONS
    reorder: bool = True  # False keeps the original unit order (the "not reordered" baseline; same anchors, levels)


def elastify(model: str, out: Path, options: ElastifyOptions = ElastifyOptions(), progress: bool = True):
    """Elastify `model` into `out`; returns (ElasticModel, seconds per step)."""
    torch.manual_seed(options.seed)
    seconds = {}
    t = time.perf_counter()
    ckpt = ingest.ingest(model)
    seconds["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    stream = corpus.token_stream(ckpt.tokenizer, "calibration")
    windows = corpus.random_windows(stream, options.calib_samples, options.calib_seq_len, options.seed)
    scores = importance.taylor_scores(ckpt.params, ckpt.config, windows, progress)
    layer_scores = importance.layer_skip_scores(ckpt.params, ckpt.config, windows, progress)
    anchors = importance.anchor_layers(layer_scores, options.anchor_fraction)
    seconds["importance"] = time.perf_counter() - t

    t = time.perf_counter()
    perm = reorder.permutation(ckpt.config, scores)
    params, config = reorder.apply(ckpt.params, ckpt.config, perm) if options.reorder else (ckpt.params, ckpt.config)
    table = levels.level_table(config, anchors, options.fractions, options.neuron_multiple)
    seconds["reorder+levels"] = time.perf_counter() - t

    t = time.perf_counter()
    meta = {
        "source": {"model": model, "path": ckpt.source},
        "calibration": {
            "corpus": corpus.CORPUS_NAME,
            "part": "calibration",
            "samples": options.calib_samples,
            "seq_len": options.calib_seq_len,
            "seed": options.seed,
        },
        "importance": "first-order Taylor |dL/dW * W| per unit; anchors by loss rise when a layer is skipped",
        "anchor_fraction": options.anchor_fraction,
        "neuron_multiple": options.neuron_multiple,
        "reordered": options.reorder,
    }
    model = elastic.ElasticModel(ckpt.name, config, anchors, table, params, ckpt.tokenizer, meta)
    elastic.save(
        Path(out),
        model,
        {
            "head_scores": scores.heads,
            "neuron_scores": scores.neurons,
            "layer_skip_loss_rise": layer_scores,
            "head_order": perm.heads,
            "kv_head_order": perm.kv_heads,
            "neuron_order": perm.neurons,
        },
    )
    seconds["save"] = time.perf_counter() - t
    return model, seconds
