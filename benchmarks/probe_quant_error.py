"""Where 4-bit quantization loses quality: full-width held-out perplexity of an elastify folder's weights (torch
reference) with the linear layers and the embedding table quantized several ways.

    python benchmarks/probe_quant_error.py dist/smollm2-135m --windows 8

Variants: fp32; each scheme of formats/quant.py (q4f32_1, q8f32_1, q4f32_mix); the symmetric 4-bit with the
embedding / tied LM head left fp32; asymmetric 4-bit groups (scale and minimum, like llama.cpp's Q4_1) on every
quantized weight, and with down_proj left fp32. It also prints, per kind of weight, the largest error of the
asymmetric 4-bit round trip (fp32, and fp16 scales and minima as q4f32_mix stores them): zero where the weights
are still the packaged GGUF's own 4-bit blocks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from elastilm.compile import corpus
from elastilm.compile.quantize import dequantize, quantize, quantized_names, simulated
from elastilm.evaluate.quality import perplexity
from elastilm.formats import elastic
from elastilm.formats.quant import SCHEMES, Format


def round_trip(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    return torch.from_numpy(dequantize(quantize(w.numpy(), fmt), fmt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    model = elastic.load(args.folder)
    cfg, params = model.config, model.params
    heldout = corpus.consecutive_windows(corpus.token_stream(model.tokenizer, "heldout"), args.windows, args.seq_len)
    names = quantized_names(cfg)
    schemes = {name: simulated(params, cfg, s) for name, s in SCHEMES.items() if s.quantized}
    asym = {**params, **{n: round_trip(params[n], Format(4, asymmetric=True)) for n in names}}
    variants = {
        "fp32": params,
        **schemes,
        "q4f32_1, embedding fp32": {
            **schemes["q4f32_1"],
            "model.embed_tokens.weight": params["model.embed_tokens.weight"],
        },
        # what a 4-bit LM head would cost (half its bytes per decoded token; the packaged embedding is Q8_0)
        "q4f32_mix, embedding 4-bit asymmetric": {
            **schemes["q4f32_mix"],
            "model.embed_tokens.weight": round_trip(
                params["model.embed_tokens.weight"], Format(4, asymmetric=True, half=True)
            ),
        },
        "asymmetric 4-bit everywhere": asym,
        "asymmetric 4-bit, down_proj fp32": {**asym, **{n: params[n] for n in names if "down_proj" in n}},
    }
    print(f"full-width perplexity, {args.windows} x {args.seq_len} held-out tokens")
    for label, p in variants.items():
        print(f"  {label:36s} {perplexity(p, cfg, heldout, None):8.2f}")
    print("largest |error| of the round trip: asymmetric 4-bit with fp32 / fp16 scales and minima:")
    half = Format(4, asymmetric=True, half=True)
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"):
        err = max(float((asym[n] - params[n]).abs().max()) for n in names if kind in n)
        err16 = max(float((round_trip(params[n], half) - params[n]).abs().max()) for n in names if kind in n)
        print(f"  {kind:12s} {err:.4f} / {err16:.4f}")


if __name__ == "__main__":
    main()
