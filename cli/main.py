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
        reorder=args.reorder,
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


def _train_tlm(args) -> None:
    from elastilm.compile.train_tlm import TLMOptions, train_tlm

    options = TLMOptions(layers=args.layers, epochs=args.epochs, grid_questions=args.grid_questions, seed=args.seed,
                         passages_per_task=args.passages, essay_chunks=args.essays)
    out = train_tlm(args.folder, args.build or args.folder / "host-cpu", options)
    print("\n" + _train_tlm_summary(json.loads((out / "tlm.json").read_text())["training"]) + f"; wrote {out}")


def _layer_drop(args) -> None:
    from elastilm.compile.layer_drop import layer_drop

    doc = layer_drop(args.folder)
    bi = doc["block_influence"]
    print("\nblock influence per layer: " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(bi)))
    for n, layers in doc["variants"].items():
        print(f"drop {n:>2} of {len(bi)} layers: {layers}")
    print(f"{doc['seconds']:.0f}s; wrote {args.folder}/layer_drop.json; compile again to add the variants")


def _quality(args) -> None:
    from elastilm.compile.quality import evaluate, markdown

    rows = evaluate(args.folder, windows=args.windows, seq_len=args.seq_len)
    print()
    print(markdown(rows, f"{args.windows} x {args.seq_len} held-out tokens"))
    print(f"wrote {args.folder}/quality.csv, quality.md, quality.png")


def _recover(args) -> None:
    from elastilm.compile.recover import RecoverOptions, recover

    options = RecoverOptions(rank=args.rank, alpha=args.alpha, tokens=args.tokens, seq_len=args.seq_len, batch=args.batch, lr=args.lr, seed=args.seed)
    summary = recover(args.folder, options)
    print(f"\nrecovery adapters (r={options.rank}, alpha={options.alpha:g}), {options.tokens} tokens per level, "
          f"{summary['train_seconds']:.0f}s")
    print(f"{'level':>6} {'KL first':>9} {'KL last':>9}")
    for row in summary["levels"]:
        print(f"{float(row['fraction']):>6.0%} {row['kl_first']:>9.4f} {row['kl_last']:>9.4f}")
    print(f"wrote {args.folder}/adapters.safetensors and recover.json; compile again to use them")


def _eval(args) -> None:
    from elastilm.evaluate.harness import Run, evaluate, markdown

    builds = {"adapters": args.build, "no-adapters": args.build, "original-order": args.original_build, "layer-drop": args.build}
    if "original-order" in args.variants and args.original_build is None:
        raise ElastiLMError("variant original-order needs --original-build (a build of `elastilm elastify --no-reorder`)")
    runs = [Run(v, builds[v]) for v in args.variants]
    acc = evaluate(runs, args.tasks, list(args.levels), list(args.ratios), args.limit, args.out)
    print()
    print(markdown(acc))
    print(f"wrote {args.out}/items.csv, accuracy.csv, accuracy.md, accuracy.png")


def _compile(args) -> None:
    from elastilm.compile.build import build

    out = build(args.folder, args.target, args.out, args.max_len, args.check_kernels)
    manifest = json.loads((out / "manifest.json").read_text())
    size = (out / manifest["library"]).stat().st_size
    checked = ""
    if manifest["target"]["device"] == "opencl":
        checked = ", kernels compiled by PoCL" if manifest["kernels_checked"] else ", OpenCL kernels NOT checked (no PoCL here)"
    print(f"{manifest['target']['name']}: compiled in {manifest['compile_seconds']:.1f}s, {manifest['library']} "
          f"{size / 1e6:.1f} MB, context {manifest['context_window']} tokens{checked} -> {out}")


def _engine(args):
    """The engine for --build or --bundle, local or on a device (--rpc / --tracker + --key)."""
    from elastilm.runtime.engine import ElasticEngine

    remote = dict(rpc=args.rpc, tracker=args.tracker, key=args.key, progress=True)
    if getattr(args, "bundle", None):
        from elastilm.compile.package import load_bundle

        return load_bundle(args.bundle, args.model, **remote)
    return ElasticEngine(args.build, **remote)


def _device_args(p) -> None:
    p.add_argument("--rpc", default=None, help="host:port of a device's RPC server (elastilm device serve)")
    p.add_argument("--tracker", default=None, help="host:port of an RPC tracker; with --key")
    p.add_argument("--key", default=None, help="device key registered with the tracker")


def _run(args) -> None:
    engine = _engine(args)
    if args.slo_ttft is not None or args.slo_tpot is not None:
        return _run_slo(args, engine)
    pieces = engine.generate(
        args.prompt, args.level, args.max_new_tokens, chat=not args.no_chat, stream=True,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def _run_slo(args, engine) -> None:
    """Plan with the TLM under the SLO, compress --context, generate, report predicted vs measured latency."""
    from elastilm.runtime.orchestrator import Answer, Orchestrator, describe
    from elastilm.runtime.planner import SLO

    if args.slo_ttft is None or args.slo_tpot is None:
        raise ElastiLMError("give both --slo-ttft and --slo-tpot")
    context = args.context.read_text() if args.context is not None and args.context.is_file() else (str(args.context) if args.context else "")
    orch = Orchestrator(engine.folder, engine, latency=args.latency)
    slo = SLO(args.slo_ttft, args.slo_tpot, relative=not args.slo_ms)
    answer = None
    for piece in orch.answer(orch.parts(args.prompt, context, chat=not args.no_chat), slo, args.max_new_tokens, stream=True,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed):
        if isinstance(piece, Answer):
            answer = piece
        else:
            print(piece, end="", flush=True)
    print()
    print(describe(answer))


def _train_tlm_summary(info: dict) -> str:
    s, d = info["score_head"], info["decision_head"]
    return (f"score head: {s['passages']} passages, loss {s['loss_first']:.3f} -> {s['loss_last20']:.3f}; held-out keep/drop "
            f"accuracy {s['heldout_keep_accuracy_before']:.1%} -> {s['heldout_keep_accuracy_after']:.1%}\n"
            f"decision head: {d['questions']} tune questions, {d['examples']} (question, SLO) labels, "
            f"loss {d['loss_first']:.3f} -> {d['loss_last']:.3f}\ntime {info['seconds']:.0f}s")


def _eval_slo(args) -> None:
    from elastilm.evaluate.slo import evaluate, markdown

    summary = evaluate(args.build, args.tasks, args.limit, args.out)
    print()
    print(markdown(summary))
    print(f"wrote {args.out}/grid-report.csv, slo-plans.csv, slo.csv, slo.md, slo.png")


def _serve(args) -> None:
    from elastilm.runtime.orchestrator import Orchestrator
    from elastilm.runtime.service import serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"elastilm: warning: serving on {args.host} without --api-key", file=sys.stderr)
    engine = _engine(args)
    orch = Orchestrator(engine.folder, engine, latency=args.latency)
    print(f"serving {engine.manifest['model']} ({engine.folder}) on {engine.session.endpoint}; latency profile: "
          f"{orch.latency.device or 'unknown device'}", file=sys.stderr)
    serve(orch, args.host, args.port, queue=args.queue, max_tokens=args.max_tokens, api_key=args.api_key, strict=not args.lenient)


def _bench_trace(args) -> None:
    from elastilm.evaluate.trace import run, summary_lines

    server = None
    if args.url is None:  # start the service on the build, on loopback
        from elastilm.runtime.service import spawn

        args.out.mkdir(parents=True, exist_ok=True)
        server, args.url = spawn(args.build, args.out / "server.log", queue=64, max_tokens=16)
    try:
        table = run(args.url, args.requests, list(args.alphas), args.strategies, args.rate, args.seed, args.out, args.api_key)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    print("\n".join(summary_lines(table)))
    print(f"wrote {args.out}/trace-requests.csv, trace.csv, trace.md, trace.png")


def _profile(args) -> None:
    from elastilm.runtime.profile import markdown, profile, write

    if args.build is None:  # FOLDER/TARGET, as `elastilm compile` writes it
        args.build = args.folder / args.target
    engine = _engine(args)
    doc = profile(engine, tuple(args.prompt_lengths), args.decode_tokens, args.repeat)
    path = write(doc, args.out or args.build)
    print(markdown(doc))
    print(f"wrote {path} and latency.png")


def _package(args) -> None:
    from elastilm.compile.package import package

    out = package(args.builds, args.out)
    print(f"bundle {out}: {', '.join(str(b) for b in args.builds)}")


def _device_serve(args) -> None:
    from elastilm.runtime.device import serve

    serve(args.host, args.port, args.tracker, args.key or "", args.cache)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _lengths(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


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
    p.add_argument("--reorder", action=argparse.BooleanOptionalAction, default=True,
                   help="sort units by importance (--no-reorder: keep the original order, a baseline)")
    p.set_defaults(run=_elastify)

    p = sub.add_parser("quality", help="held-out perplexity per level, reordered vs original order")
    p.add_argument("folder", type=Path, help="an elastify output folder")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=256)
    p.set_defaults(run=_quality)

    p = sub.add_parser("layer-drop", help="the layer-dropping baseline (ShortGPT): which layers to skip, per level's budget")
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.set_defaults(run=_layer_drop)

    p = sub.add_parser("recover", help="train one LoRA adapter per level by distillation from the full model (resumable)")
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument("--tokens", type=int, default=49152, help="training tokens per level (the time budget)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_recover)

    p = sub.add_parser("train-tlm", help="train the TLM (compression + plan heads) from the elastic LLM's own answers (resumable)")
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument("--build", type=Path, default=None, help="its host build with latency.json (default FOLDER/host-cpu)")
    p.add_argument("--layers", type=int, default=3, help="BERT layers of the backbone (of 6)")
    p.add_argument("--epochs", type=int, default=3, help="score-head epochs")
    p.add_argument("--passages", type=int, default=24, help="few-shot prompts per task labelled for the score head")
    p.add_argument("--essays", type=int, default=40, help="essay chunks labelled for the score head")
    p.add_argument("--grid-questions", type=int, default=16, help="tune questions per task run at every (ratio, level)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_train_tlm)

    p = sub.add_parser("eval", help="accuracy per level on the benchmarks, through the compiled engine (resumable)")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a compile output folder")
    p.add_argument("--original-build", type=Path, default=None, help="a build of the not-reordered model (original-order)")
    p.add_argument("--variants", type=_names, default=["adapters", "no-adapters"], help="adapters,no-adapters,original-order,layer-drop")
    p.add_argument("--tasks", type=_names, default=["arc_easy", "obqa", "piqa", "sciq", "droidtask"])
    p.add_argument("--levels", type=_fractions, default=DEFAULT_FRACTIONS)
    p.add_argument("--ratios", type=_fractions, default=(1.0,), help="prompt ratios of the few-shot prefix")
    p.add_argument("--limit", type=int, default=None, help="items per task from the report split (default all)")
    p.add_argument("--out", type=Path, default=Path("dist/eval"))
    p.set_defaults(run=_eval)

    p = sub.add_parser("eval-slo", help="accuracy under the paper's SLO pairs: TLM-planned vs baselines (resumable)")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a build with tlm/ and latency.json")
    p.add_argument("--tasks", type=_names, default=["arc_easy", "obqa", "piqa", "sciq", "droidtask"])
    p.add_argument("--limit", type=int, default=30, help="report questions per task")
    p.add_argument("--out", type=Path, default=Path("dist/eval-slo"))
    p.set_defaults(run=_eval_slo)

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
    p.add_argument("--bundle", type=Path, default=None, help="an `elastilm package` folder (instead of --build)")
    p.add_argument("--model", default=None, help="model id inside a bundle with several")
    _device_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT budget: a fraction of the full model's (or ms with --slo-ms); "
                   "the TLM then picks the level and prompt ratio (needs a trained TLM in the build)")
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT budget, likewise")
    p.add_argument("--slo-ms", action="store_true", help="the SLO budgets are milliseconds")
    p.add_argument("--context", type=Path, default=None, help="system / few-shot text (or a file of it) that may be compressed")
    p.add_argument("--latency", type=Path, default=None, help="the latency profile to plan with (default: the build's latency.json)")
    p.set_defaults(run=_run)

    p = sub.add_parser("profile", help="measure TTFT and TPOT of every level on the device; writes latency.json")
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument("--target", default="host-cpu", help="the preset it was compiled for: profiles FOLDER/TARGET")
    p.add_argument("--build", type=Path, default=None, help="a compile output folder (instead of FOLDER/TARGET)")
    p.add_argument("--out", type=Path, default=None, help="folder for latency.json/png (default: the build folder)")
    p.add_argument("--prompt-lengths", type=_lengths, default=[32, 64, 128, 256, 512], help="comma-separated")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="prefills per point (the median is kept)")
    _device_args(p)
    p.set_defaults(run=_profile, bundle=None)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP service with latency objectives (loopback by default)")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a build with tlm/ and latency.json")
    p.add_argument("--bundle", type=Path, default=None, help="an `elastilm package` folder (instead of --build)")
    p.add_argument("--model", default=None, help="model id inside a bundle with several")
    _device_args(p)
    p.add_argument("--latency", type=Path, default=None, help="the latency profile to plan with (default: the build's "
                   "latency.json; over RPC give one measured over that link, `elastilm profile --rpc ... --out`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait; more get 429")
    p.add_argument("--max-tokens", type=int, default=256, help="cap on max_tokens per request")
    p.add_argument("--lenient", action="store_true", help="ignore unknown request fields instead of answering 400")
    p.set_defaults(run=_serve)

    p = sub.add_parser("bench", help="benchmarks against the service")
    bench = p.add_subparsers(dest="benchmark", required=True)
    p = bench.add_parser("trace", help="replay app requests (Poisson arrivals) per strategy; accuracy and SLO attainment")
    p.add_argument("--url", default=None, help="a running `elastilm serve` (default: start one on --build)")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"))
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=36, help="requests per trace")
    p.add_argument("--alphas", type=_fractions, default=(0.0, 0.25, -0.25), help="app-share skews e^(alpha i)")
    p.add_argument("--strategies", type=_names, default=None, help="comma-separated (default: all of runtime.planner.STRATEGIES)")
    p.add_argument("--rate", type=float, default=0.5, help="arrivals per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("dist/trace"))
    p.set_defaults(run=_bench_trace)

    p = sub.add_parser("package", help="bundle build folders with an app config for app assets")
    p.add_argument("builds", type=Path, nargs="+", help="compile output folders")
    p.add_argument("--out", type=Path, required=True, help="bundle folder, e.g. dist/bundle-android")
    p.set_defaults(run=_package)

    p = sub.add_parser("device", help="the device side of RPC")
    device = p.add_subparsers(dest="action", required=True)
    p = device.add_parser("serve", help="run a TVM RPC server with elastilm's upload cache (until Ctrl-C)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--tracker", default=None, help="host:port of a tracker to register with")
    p.add_argument("--key", default=None, help="device key for the tracker")
    p.add_argument("--cache", type=Path, default=None, help="upload cache folder (default ~/.cache/elastilm-device)")
    p.set_defaults(run=_device_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ElastiLMError as e:
        print(f"elastilm: error: {e}", file=sys.stderr)
        return 2
    return 0
