"""Latency profile of a build on its device: TTFT and TPOT over a grid of prompt lengths, for every level.

The result, `latency.json` in the build folder (formats/latency.py; with the layer-dropping variants, when the build
has them), is what the planner reads to pick a level that meets a request's TTFT/TPOT objective on this device.
Timings are wall-clock around whole calls as the runtime makes
them (over RPC they include the round trips, as a client on that link would see).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from elastilm.formats import latency as latency_file
from elastilm.runtime_py.engine import ElasticEngine


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def profile(
    engine: ElasticEngine,
    prompt_lengths: tuple[int, ...] = (32, 64, 128, 256, 512),
    decode_tokens: int = 16,
    repeat: int = 3,
    progress: bool = True,
) -> dict:
    """Measure every level; returns the latency document (see `write`)."""
    from tqdm import tqdm

    lengths = [n for n in prompt_lengths if n + decode_tokens <= engine.max_len]
    vocab = engine.elastic["config"]["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, max(lengths)).tolist()  # latency does not depend on content
    engine.prefill(ids[:8], 1.0)  # first call: lazy initialisation on the device
    levels = sorted(engine.levels)
    drops = engine.layer_drops
    bar = tqdm(total=(len(levels) + len(drops)) * len(lengths), desc="profile", unit="point", disable=not progress)

    def measure(eng: ElasticEngine, fraction: float) -> dict:
        ttft, tpot = [], []
        for n in lengths:
            ttft.append(_median_ms(lambda: eng.prefill(ids[:n], fraction), repeat))  # noqa: B023 (called at once)
            # the cache now holds the n prompt positions: the tokens decoded right after such a prompt
            steps = [_median_ms(lambda i=i: eng.decode(ids[i], n + i, fraction), 1) for i in range(decode_tokens)]  # noqa: B023
            tpot.append(float(np.median(steps)))
            bar.update()
        return {"ttft_ms": [round(t, 3) for t in ttft], "tpot_ms": [round(t, 3) for t in tpot]}

    rows = [{"fraction": fraction, **measure(engine, fraction)} for fraction in levels]
    # the layer-dropping baseline's variants (full width, layers skipped); "fraction": the share of layers kept
    layers = engine.elastic["config"]["num_layers"]
    dropped = [
        {"fraction": round(1 - n / layers, 6), "dropped": n, "layers": which, **measure(engine.dropped(n), 1.0)}
        for n, which in sorted(drops.items())
    ]
    bar.close()
    return {
        "schema": latency_file.SCHEMA,
        "schema_version": latency_file.VERSION,
        "model": engine.manifest["model"],
        "target": engine.manifest["target"]["name"],
        "device": engine.session.endpoint
        if engine.session.endpoint != "this process"
        else f"{platform.machine()} host",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompt_lengths": lengths,
        "decode_tokens": decode_tokens,
        "repeat": repeat,
        "levels": rows,
        **({"layer_drop": dropped} if dropped else {}),
    }


def write(doc: dict, folder: Path) -> Path:
    """latency.json plus latency.png (TTFT over prompt length, TPOT over context length, per level) in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    path = latency_file.write(folder, doc)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in doc["levels"]:
        left.plot(doc["prompt_lengths"], row["ttft_ms"], marker="o", label=f"{row['fraction']:.0%}")
    left.set(xlabel="prompt tokens", ylabel="TTFT (ms)", title="time to first token")
    left.legend(title="level", fontsize=7)
    for row in doc["levels"]:
        right.plot(doc["prompt_lengths"], row["tpot_ms"], marker="o", label=f"{row['fraction']:.0%}")
    for row in doc.get("layer_drop", []):  # the layer-dropping baseline beside the elastic levels
        right.plot(doc["prompt_lengths"], row["tpot_ms"], color="tab:gray", linestyle="--", linewidth=0.8)
    if doc.get("layer_drop"):
        right.plot([], [], color="tab:gray", linestyle="--", linewidth=0.8, label="layers dropped")
    right.legend(title="level", fontsize=7)
    right.set(xlabel="tokens in the context", ylabel="TPOT (ms)", title="time per output token, after a prompt")
    fig.suptitle(f"{doc['model']} on {doc['target']} ({doc['device']})")
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)
    return path


def markdown(doc: dict) -> str:
    lengths = doc["prompt_lengths"]
    head = (
        "| level | "
        + " | ".join(f"TTFT {n} tok (ms)" for n in lengths)
        + " | "
        + " | ".join(f"TPOT after {n} (ms)" for n in lengths)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 * len(lengths) + 1)]
    rows = [(f"{r['fraction']:.0%}", r) for r in doc["levels"]]
    rows += [(f"drop {r['dropped']} layers", r) for r in doc.get("layer_drop", [])]
    for name, r in rows:
        lines.append(
            f"| {name} | "
            + " | ".join(f"{t:.1f}" for t in r["ttft_ms"])
            + " | "
            + " | ".join(f"{t:.2f}" for t in r["tpot_ms"])
            + " |"
        )
    return "\n".join(lines)
