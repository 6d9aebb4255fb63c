"""Quality per level: held-out perplexity of the reordered prefix vs the same widths without reordering, and
with each level's recovery adapter once `elastilm recover` has run; with a quantized scheme, of the weights as
that build computes with them (compile/quantize.simulated)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from tqdm import tqdm

from elastilm.compile import corpus, ingest, reference
from elastilm.compile.quantize import simulated, simulated_adapters
from elastilm.formats import adapters as adapters_file
from elastilm.formats import elastic, quant
from elastilm.formats.widths import layer_widths

COLUMNS = ["level", "kept", "heads", "neurons", "ppl_reordered", "ppl_original_order", "ppl_adapters"]


@torch.no_grad()
def perplexity(params, cfg, windows: torch.Tensor, widths, batch: int = 4, adapters=None) -> float:
    """exp(mean next-token NLL) over `windows` (N, T)."""
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total += reference.next_token_loss(params, cfg, chunk, widths, adapters).item() * n
        count += n
    return math.exp(total / count)


def evaluate(
    folder: Path, windows: int = 24, seq_len: int = 256, progress: bool = True, scheme: str = "q0f32"
) -> list[dict]:
    """Perplexity per level on held-out text; writes quality.{csv,md,png} into `folder` (quality-<scheme>.* for a
    quantized scheme, without the original-order column, which is about reordering)."""
    folder = Path(folder)
    s = quant.scheme(scheme)  # a wrong name fails before any loading
    model = elastic.load(folder)
    params = simulated(model.params, model.config, s)
    original = None if s.quantized else ingest.ingest(model.meta["source"]["model"])
    adapters = adapters_file.load(folder)
    heldout = corpus.consecutive_windows(corpus.token_stream(model.tokenizer, "heldout"), windows, seq_len)
    rows = []
    bar = tqdm(model.levels.values(), desc="perplexity per level", unit="level", disable=not progress)
    for lv in bar:
        rows.append(
            {
                "level": lv.fraction,
                "kept": lv.kept,
                "heads": lv.heads,
                "neurons": lv.neurons,
                "ppl_reordered": perplexity(params, model.config, heldout, model.widths(lv.fraction)),
                # the same widths and anchors, applied to the original (not reordered) weights
                "ppl_original_order": perplexity(
                    original.params, original.config, heldout, layer_widths(original.config, model.anchors, lv)
                )
                if original
                else None,
                # level 1.0 has no adapter (it is the distillation teacher); blank before `elastilm recover`
                "ppl_adapters": perplexity(
                    params,
                    model.config,
                    heldout,
                    model.widths(lv.fraction),
                    adapters=simulated_adapters(adapters.get(lv.fraction), s),
                )
                if adapters
                else None,
            }
        )
    caption = f"{windows} x {seq_len} held-out tokens ({corpus.CORPUS_NAME}, held-out part)"
    if s.quantized:
        caption += f", {s.name} weights, adapters trained on {adapters_file.trained_on(folder)}"
    _write(folder, rows, caption, report_stem(s.name))
    return rows


def report_stem(scheme: str) -> str:
    """The file name (without suffix) of the quality report of `scheme`: quality, or quality-<scheme>."""
    return "quality" if not quant.scheme(scheme).quantized else f"quality-{scheme}"


def markdown(rows: list[dict], caption: str) -> str:
    lines = [
        f"Perplexity on {caption}; lower is better.",
        "",
        "| level | params kept | heads | neurons | ppl reordered | ppl original order | ppl reordered + adapter |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        adapted = "" if r.get("ppl_adapters") is None else f"{r['ppl_adapters']:.2f}"
        original = "" if r.get("ppl_original_order") is None else f"{r['ppl_original_order']:.2f}"
        lines.append(
            f"| {r['level']:.0%} | {r['kept']:.1%} | {r['heads']} | {r['neurons']} | "
            f"{r['ppl_reordered']:.2f} | {original} | {adapted} |"
        )
    return "\n".join(lines) + "\n"


def _write(folder: Path, rows: list[dict], caption: str, stem: str = "quality") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(folder / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (folder / f"{stem}.md").write_text(markdown(rows, caption))
    fig, ax = plt.subplots(figsize=(6, 4))
    kept = [r["kept"] * 100 for r in rows]
    ax.plot(kept, [r["ppl_reordered"] for r in rows], "o-", label="reordered prefix")
    if rows[0].get("ppl_original_order") is not None:
        ax.plot(kept, [r["ppl_original_order"] for r in rows], "s--", label="same widths, original order")
    if rows[0].get("ppl_adapters") is not None:
        ax.plot(kept, [r["ppl_adapters"] for r in rows], "^-", label="reordered prefix + recovery adapter")
    ax.set_yscale("log")
    ax.set_xlabel("elastic parameters kept (%)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(caption, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / f"{stem}.png", dpi=120)
    plt.close(fig)
