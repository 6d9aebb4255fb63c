"""run, profile: generate at a level (or under an SLO), and measure a build's latency per level."""

from __future__ import annotations

from pathlib import Path

from elastilm.cli.common import device_args, engine, lengths, serving_process
from elastilm.formats.errors import ElastiLMError


def register(sub) -> None:
    p = sub.add_parser("run", help="generate text at a level, printing tokens as they come")
    p.add_argument("prompt")
    p.add_argument("--level", type=float, default=1.0, help="share of elastic parameters, e.g. 0.5")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a compile output folder")
    p.add_argument("--bundle", type=Path, default=None, help="an `elastilm package` folder (instead of --build)")
    p.add_argument("--model", default=None, help="model id inside a bundle with several")
    device_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2: minus count x this per answer token")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2: minus this once per answer token")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already seen")
    p.add_argument("--stop", action="append", default=[], help="end the answer before this text (repeatable, <= 4)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument(
        "--slo-ttft",
        type=float,
        default=None,
        help="TTFT budget: a fraction of the full model's (or ms with --slo-ms); "
        "the TLM then picks the level and prompt ratio (needs a trained TLM in the build)",
    )
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT budget, likewise")
    p.add_argument("--slo-ms", action="store_true", help="the SLO budgets are milliseconds")
    p.add_argument(
        "--context",
        type=Path,
        default=None,
        help="system / few-shot text (or a file of it) before the prompt; under an SLO it may be compressed",
    )
    p.add_argument(
        "--latency",
        type=Path,
        default=None,
        help="the latency profile to plan with (default: the build's latency.json)",
    )
    p.set_defaults(run=run)

    p = sub.add_parser("profile", help="measure TTFT and TPOT of every level on the device; writes latency.json")
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument("--target", default="host-cpu", help="the preset it was compiled for: profiles FOLDER/TARGET")
    p.add_argument("--build", type=Path, default=None, help="a compile output folder (instead of FOLDER/TARGET)")
    p.add_argument("--out", type=Path, default=None, help="folder for latency.json/png (default: the build folder)")
    p.add_argument("--prompt-lengths", type=lengths, default=[32, 64, 128, 256, 512], help="comma-separated")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="prefills per point (the median is kept)")
    device_args(p)
    p.set_defaults(run=profile, bundle=None)


def context(args) -> str:
    """--context: a file's text, or the text itself ("" when not given)."""
    if args.context is None:
        return ""
    return args.context.read_text() if args.context.is_file() else str(args.context)


def run(args) -> None:
    serving_process()
    if args.slo_ttft is not None or args.slo_tpot is not None:
        return run_slo(args)
    pieces = engine(args).generate(
        args.prompt,
        args.level,
        args.max_new_tokens,
        chat=not args.no_chat,
        stream=True,
        sampling=sampling(args),
        system=context(args) or None,
    )
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def sampling(args):
    from elastilm.runtime_py.sampling import Sampling

    return Sampling(
        args.temperature,
        args.top_p,
        args.seed,
        args.frequency_penalty,
        args.presence_penalty,
        args.repetition_penalty,
        tuple(args.stop),
    )


def run_slo(args) -> None:
    """Plan with the TLM under the SLO, compress --context, generate, report predicted vs measured latency."""
    from elastilm.runtime_py.orchestrator import Answer, Orchestrator, Request, describe
    from elastilm.runtime_py.planner import SLO

    if args.slo_ttft is None or args.slo_tpot is None:
        raise ElastiLMError("give both --slo-ttft and --slo-tpot")
    eng = engine(args)
    orch = Orchestrator(eng.folder, eng, latency=args.latency)
    request = Request(
        args.prompt,
        context(args),
        not args.no_chat,
        SLO(args.slo_ttft, args.slo_tpot, relative=not args.slo_ms),
        args.max_new_tokens,
        sampling=sampling(args),
    )
    answer = None
    for piece in orch.answer(request, stream=True):
        if isinstance(piece, Answer):
            answer = piece
        else:
            print(piece, end="", flush=True)
    print()
    print(describe(answer))


def profile(args) -> None:
    from elastilm.runtime_py.profile import markdown, profile, write

    if args.build is None:  # FOLDER/TARGET, as `elastilm compile` writes it
        args.build = args.folder / args.target
    doc = profile(engine(args), tuple(args.prompt_lengths), args.decode_tokens, args.repeat)
    path = write(doc, args.out or args.build)
    print(markdown(doc))
    print(f"wrote {path} and latency.png")
