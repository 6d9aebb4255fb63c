"""elastify, layer-drop, quality: the elastify folder and what is measured on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from elastilm.cli.common import fractions, names
from elastilm.compile.levels import DEFAULT_FRACTIONS


def register(sub) -> None:
    p = sub.add_parser("elastify", help="reorder a model so every prefix is a sub-model; write the level table")
    p.add_argument("--model", default="smollm2-135m", help="packaged name, .gguf file or Hugging Face folder")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. dist/smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--calib-seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anchor-fraction", type=float, default=0.2)
    p.add_argument("--neuron-multiple", type=int, default=64)
    p.add_argument(
        "--levels", type=fractions, default=DEFAULT_FRACTIONS, help="comma-separated fractions (default 0.2..1.0)"
    )
    p.add_argument(
        "--reorder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sort units by importance (--no-reorder: keep the original order, a baseline)",
    )
    p.set_defaults(run=elastify)

    p = sub.add_parser(
        "layer-drop", help="the layer-dropping baseline (ShortGPT): which layers to skip, per level's budget"
    )
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.set_defaults(run=layer_drop)

    p = sub.add_parser(
        "quality", help="held-out perplexity per level, reordered vs original order (--generate: free-text answers)"
    )
    p.add_argument("folder", type=Path, help="an elastify output folder")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--quant", default="q0f32", help="perplexity of the weights as a build with this scheme computes (q4f32_1 ..)"
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="instead: answer held-out chat prompts at every level through the compiled build (resumable)",
    )
    p.add_argument("--build", type=Path, default=None, help="with --generate: the build (default FOLDER/host-cpu)")
    p.add_argument("--levels", type=fractions, default=DEFAULT_FRACTIONS, help="with --generate")
    p.add_argument("--variants", type=names, default=["adapters"], help="with --generate: adapters, no-adapters")
    p.add_argument("--limit", type=int, default=None, help="with --generate: prompts (default all 60)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --generate")
    p.add_argument(
        "--prompts",
        default="heldout",
        help="with --generate: heldout (report), tune (for decisions) or a JSON-lines file of id, prompt",
    )
    p.add_argument("--out", type=Path, default=None, help="with --generate (default FOLDER/generation)")
    p.set_defaults(run=quality)


def elastify(args) -> None:
    from elastilm.compile.elastify import ElastifyOptions, elastify

    options = ElastifyOptions(
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        seed=args.seed,
        anchor_fraction=args.anchor_fraction,
        neuron_multiple=args.neuron_multiple,
        fractions=args.levels,
        reorder=args.reorder,
    )
    model, seconds = elastify(args.model, args.out, options)
    cfg = model.config
    print(
        f"\n{model.name}: {cfg.num_layers} layers, {cfg.num_heads} query heads / {cfg.num_kv_heads} KV heads, "
        f"FFN {cfg.intermediate_size}; anchor layers {model.anchors}"
    )
    print(f"{'level':>6} {'kept':>7} {'heads':>6} {'neurons':>8}   (per non-anchor layer)")
    for lv in model.levels.values():
        print(f"{lv.fraction:>6.0%} {lv.kept:>7.1%} {lv.heads:>6} {lv.neurons:>8}")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) + f"; total {sum(seconds.values()):.1f}s")
    print(f"wrote {Path(args.out) / 'elastic.json'}")


def layer_drop(args) -> None:
    from elastilm.compile.layer_drop import layer_drop

    doc = layer_drop(args.folder)
    bi = doc["block_influence"]
    print("\nblock influence per layer: " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(bi)))
    for n, layers in doc["variants"].items():
        print(f"drop {n:>2} of {len(bi)} layers: {layers}")
    print(f"{doc['seconds']:.0f}s; wrote {args.folder}/layer_drop.json; compile again to add the variants")


def quality(args) -> None:
    if args.generate:
        return generation(args)
    from elastilm.evaluate.quality import evaluate, markdown, report_stem

    rows = evaluate(args.folder, windows=args.windows, seq_len=args.seq_len, scheme=args.quant)
    stem = report_stem(args.quant)
    print()
    print(markdown(rows, f"{args.windows} x {args.seq_len} held-out tokens, {args.quant} weights"))
    print(f"wrote {args.folder}/{stem}.csv, {stem}.md, {stem}.png")


def generation(args) -> None:
    from elastilm.evaluate.generation import PROMPT_SETS, markdown, run

    out = args.out or args.folder / "generation"
    build = args.build or args.folder / "host-cpu"
    rows = run(
        build,
        out,
        args.levels,
        args.variants,
        args.limit,
        args.max_new_tokens,
        prompts_file=PROMPT_SETS.get(args.prompts, Path(args.prompts)),
    )
    print(markdown(rows))
    print(f"wrote {out}/answers.csv, generation.csv, generation.md, generation.png, samples.md")
