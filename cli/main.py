"""`elastilm` command line: parses arguments and calls the library; user errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from elastilm import ElastiLMError
from elastilm.compile.levels import DEFAULT_FRACTIONS


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.2,0.5,1.0, got '{text}'")


def _elastify(args) -> None:
    from elastilm.compile.elastify import ElastifyOptions, elastify

    options = ElastifyOptions(
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        seed=args.seed,
        anchor_fraction=args.anchor_fraction,
        neuron_multiple=args.neuron_multiple,
        fractions=args.levels,
    )
    model, seconds = elastify(args.model, args.out, options)
    cfg = model.config
    print(f"\n{model.name}: {cfg.num_layers} layers, {cfg.num_heads} query heads / {cfg.num_kv_heads} KV heads, "
          f"FFN {cfg.intermediate_size}; anchor layers {model.anchors}")
    print(f"{'level':>6} {'kept':>7} {'heads':>6} {'neurons':>8}   (per non-anchor layer)")
    for lv in model.levels:
        print(f"{lv.fraction:>6.0%} {lv.kept:>7.1%} {lv.heads:>6} {lv.neurons:>8}")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) + f"; total {sum(seconds.values()):.1f}s")
    print(f"wrote {Path(args.out) / 'elastic.json'}")


def _quality(args) -> None:
    from elastilm.compile.quality import evaluate, markdown

    rows = evaluate(args.folder, windows=args.windows, seq_len=args.seq_len)
    print()
    print(markdown(rows, f"{args.windows} x {args.seq_len} held-out tokens"))
    print(f"wrote {args.folder}/quality.csv, quality.md, quality.png")


def _compile(args) -> None:
    from elastilm.compile.build import build

    out = build(args.folder, args.target, args.out, args.max_len, args.check_kernels)
    manifest = json.loads((out / "manifest.json").read_text())
    size = (out / manifest["library"]).stat().st_size
    checked = {"pocl": ", kernels compiled by PoCL", None: ""}[manifest["kernels_checked"]]
    if manifest["target"]["device"] == "opencl" and not manifest["kernels_checked"]:
        checked = ", OpenCL kernels NOT checked (no PoCL here)"
    print(f"{manifest['target']['name']}: compiled in {manifest['compile_seconds']:.1f}s, {manifest['library']} "
          f"{size / 1e6:.1f} MB, context {manifest['context_window']} tokens{checked} -> {out}")


def _run(args) -> None:
    from elastilm.runtime.engine import ElasticEngine

    engine = ElasticEngine(args.build)
    pieces = engine.generate(
        args.prompt, args.level, args.max_new_tokens, chat=not args.no_chat, stream=True,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastilm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("elastify", help="reorder a model so every prefix is a sub-model; write the level table")
    p.add_argument("--model", default="smollm2-135m", help="packaged name, .gguf file or Hugging Face folder")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. dist/smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--calib-seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anchor-fraction", type=float, default=0.2)
    p.add_argument("--neuron-multiple", type=int, default=64)
    p.add_argument("--levels", type=_fractions, default=DEFAULT_FRACTIONS, help="comma-separated fractions (default 0.2..1.0)")
    p.set_defaults(run=_elastify)

    p = sub.add_parser("quality", help="held-out perplexity per level, reordered vs original order")
    p.add_argument("folder", type=Path, help="an elastify output folder")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=256)
    p.set_defaults(run=_quality)

    p = sub.add_parser("compile", help="compile an elastified model for a target (one library for all levels)")
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument("--target", default="host-cpu", help="a preset name from targets/")
    p.add_argument("--out", type=Path, default=None, help="default: FOLDER/TARGET")
    p.add_argument("--max-len", type=int, default=2048, help="context window (KV cache rows)")
    p.add_argument(
        "--check-kernels", action=argparse.BooleanOptionalAction, default=None,
        help="compile OpenCL kernels with PoCL before writing the library (default: when PoCL is installed)",
    )
    p.set_defaults(run=_compile)

    p = sub.add_parser("run", help="generate text at a level, printing tokens as they come")
    p.add_argument("prompt")
    p.add_argument("--level", type=float, default=1.0, help="share of elastic parameters, e.g. 0.5")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a compile output folder")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="send the prompt as is, without the chat template")
    p.set_defaults(run=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ElastiLMError as e:
        print(f"elastilm: error: {e}", file=sys.stderr)
        return 2
    return 0
