"""eval, eval-slo, bench trace: accuracy per level, under SLOs, and the trace replay against the service."""

from __future__ import annotations

from pathlib import Path

from elastilm.cli.common import fractions, names
from elastilm.compile.levels import DEFAULT_FRACTIONS

TASKS = ["arc_easy", "obqa", "piqa", "sciq", "droidtask"]


def register(sub) -> None:
    p = sub.add_parser("eval", help="accuracy per level on the benchmarks, through the compiled engine (resumable)")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a compile output folder")
    p.add_argument(
        "--original-build", type=Path, default=None, help="a build of the not-reordered model (original-order)"
    )
    p.add_argument(
        "--variants",
        type=names,
        default=["adapters", "no-adapters"],
        help="adapters,no-adapters,original-order,layer-drop",
    )
    p.add_argument("--tasks", type=names, default=TASKS)
    p.add_argument("--levels", type=fractions, default=DEFAULT_FRACTIONS)
    p.add_argument("--ratios", type=fractions, default=(1.0,), help="prompt ratios of the few-shot prefix")
    p.add_argument("--limit", type=int, default=None, help="items per task from the report split (default all)")
    p.add_argument("--out", type=Path, default=Path("dist/eval"))
    p.set_defaults(run=eval_)

    p = sub.add_parser("eval-slo", help="accuracy under the paper's SLO pairs: TLM-planned vs baselines (resumable)")
    p.add_argument(
        "--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a build with tlm/ and latency.json"
    )
    p.add_argument("--tasks", type=names, default=TASKS)
    p.add_argument("--limit", type=int, default=30, help="report questions per task")
    p.add_argument("--out", type=Path, default=Path("dist/eval-slo"))
    p.set_defaults(run=eval_slo)

    p = sub.add_parser("bench", help="benchmarks against the service")
    bench = p.add_subparsers(dest="benchmark", required=True)
    p = bench.add_parser(
        "trace", help="replay app requests (Poisson arrivals) per strategy; accuracy and SLO attainment"
    )
    p.add_argument("--url", default=None, help="a running `elastilm serve` (default: start one on --build)")
    p.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"))
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=36, help="requests per trace")
    p.add_argument("--alphas", type=fractions, default=(0.0, 0.25, -0.25), help="app-share skews e^(alpha i)")
    p.add_argument(
        "--strategies", type=names, default=None, help="comma-separated (default: all of runtime_py.planner.STRATEGIES)"
    )
    p.add_argument("--rate", type=float, default=0.5, help="arrivals per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--questions", type=int, default=None, help="each app draws from its first N report questions (default all)"
    )
    p.add_argument("--out", type=Path, default=Path("dist/trace"))
    p.add_argument(
        "--simulate",
        type=Path,
        default=None,
        metavar="REPLAY",
        help="simulate the traces instead (evaluate/simulate.py) with the latency scatter and TLM cost measured in "
        "this replay folder, one simulated service per --seeds; needs --questions",
    )
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument(
        "--validate",
        type=Path,
        default=None,
        metavar="REPLAY",
        help="simulate the traces replayed in this folder and compare request by request (trace-agreement.md)",
    )
    p.add_argument(
        "--outcomes",
        type=Path,
        default=Path("dist/trace-outcomes.csv"),
        help="the outcome grid the simulation reads and fills (resumable, per build)",
    )
    p.set_defaults(run=bench_trace)


def eval_(args) -> None:
    from elastilm.evaluate.harness import evaluate, markdown, runs

    acc = evaluate(
        runs(args.variants, args.build, args.original_build),
        args.tasks,
        list(args.levels),
        list(args.ratios),
        args.limit,
        args.out,
    )
    print()
    print(markdown(acc))
    print(f"wrote {args.out}/items.csv, accuracy.csv, accuracy.md, accuracy.png")


def eval_slo(args) -> None:
    from elastilm.evaluate.slo import evaluate, markdown

    summary = evaluate(args.build, args.tasks, args.limit, args.out)
    print()
    print(markdown(summary))
    print(f"wrote {args.out}/grid-report.csv, slo-plans.csv, slo.csv, slo.md, slo.png")


def bench_trace(args) -> None:
    from elastilm.evaluate import simulate
    from elastilm.evaluate.trace import run
    from elastilm.evaluate.trace_report import summary_lines
    from elastilm.formats.errors import ElastiLMError
    from elastilm.runtime_py.planner import STRATEGIES

    if args.validate is not None:
        from elastilm.runtime_py.orchestrator import Orchestrator

        orch = Orchestrator(args.build)
        try:
            table = simulate.validate(orch, args.validate, args.outcomes)
        finally:
            orch.close()
        print((args.validate / "trace-agreement.md").read_text())
        print(f"wrote {args.validate}/trace-simulated.csv, trace-agreement.md")
        return
    if args.simulate is not None:
        if args.questions is None:
            raise ElastiLMError("--simulate draws from the outcome grid's questions: give --questions (e.g. 100)")
        table = simulate.run(
            args.build,
            args.simulate,
            list(args.alphas),
            args.strategies or list(STRATEGIES),
            args.requests,
            args.rate,
            args.seeds,
            args.questions,
            8,
            args.outcomes,
            args.out,
        )
        print("\n".join(summary_lines(table)))
        print((args.out / "trace-gaps.md").read_text())
        print(f"wrote {args.out}/trace-requests.csv, trace.csv, trace.md, trace.png, trace-gaps.md, trace-gaps.png")
        return
    table = run(
        args.url,
        args.requests,
        list(args.alphas),
        args.strategies,
        args.rate,
        args.seed,
        args.out,
        args.api_key,
        build=args.build,
        questions=args.questions,
    )
    print("\n".join(summary_lines(table)))
    print(f"wrote {args.out}/trace-requests.csv, trace.csv, trace.md, trace.png")
