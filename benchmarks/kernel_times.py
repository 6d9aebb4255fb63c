"""Where a decoded token's time goes: each library kernel's time per token, summed over the layers, from the VM's
instrument hook (its own cost, about 1 us per call, included), at one level after a prompt of a given length.

    python benchmarks/kernel_times.py dist/smollm2-135m/host-cpu --level 1.0 --past 256 --tokens 32
    python benchmarks/kernel_times.py dist/smollm2-135m/host-cpu --level 1.0 --past 256 --prefill
    python benchmarks/kernel_times.py dist/smollm2-135m/host-cpu --level 0.5 --past 256 --no-adapters

With `--prefill`, the kernels of one prefill of `--past` tokens instead (rows in ms per prefill).

Kernels are grouped by name without their numeric suffix (q_proj1, q_proj2 ... -> q_proj; kernels the compiler
found identical share one name, e.g. gate_proj serves up_proj too); VM built-ins (shape checks, allocation) are
summed as one row, which is mostly the hook's own Python cost (about 3.5 us per call here, against a wall-clock
TPOT that includes them unhooked). Compare kernel rows, not the total.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections import defaultdict

os.environ.setdefault("TVM_NUM_THREADS", "2")


def main() -> None:
    import tvm

    from elastilm.runtime_py.engine import ElasticEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", help="a build folder")
    parser.add_argument("--level", type=float, default=1.0)
    parser.add_argument("--past", type=int, default=256, help="positions in the cache before the decoded tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens measured")
    parser.add_argument("--prefill", action="store_true", help="time one prefill of --past tokens instead")
    parser.add_argument("--no-adapters", action="store_true", help="run the level without its recovery adapter")
    args = parser.parse_args()
    if args.prefill:
        args.tokens = 1
    engine = ElasticEngine(args.build, adapters=not args.no_adapters)
    prompt = engine.encode("The quick brown fox jumps over the lazy dog. " * 200)[: args.past]
    engine.prefill(prompt, args.level)
    for i in range(4):  # warm-up
        engine.decode(prompt[i], args.past + i, args.level)
    engine.prefill(prompt, args.level)
    start = time.perf_counter()
    for i in range(args.tokens):
        engine.decode(prompt[i], args.past + i, args.level)
    wall = (time.perf_counter() - start) / args.tokens * 1e3

    totals, calls, started = defaultdict(float), defaultdict(int), {}

    def instrument(func, symbol, before, ret, *_):
        name = re.sub(r"\d+$", "", symbol)
        name = name if not name.startswith("vm.builtin") else "VM built-ins"
        if before:
            started[symbol] = time.perf_counter()
        else:
            totals[name] += time.perf_counter() - started.pop(symbol)
            calls[name] += 1
        return tvm.relax.VMInstrumentReturnKind.NO_OP

    engine.prefill(prompt, args.level)
    engine.vm.set_instrument(instrument)
    if args.prefill:
        engine.prefill(prompt, args.level)
    else:
        for i in range(args.tokens):
            engine.decode(prompt[i], args.past + i, args.level)
    engine.vm.set_instrument(None)
    what = (
        f"one prefill of {args.past} tokens" if args.prefill else f"after {args.past} positions, {args.tokens} tokens"
    )
    adapter = "without its adapter" if args.no_adapters else "with its adapter"
    print(f"{args.build}: level {args.level:g} {adapter}, {what}")
    per = "prefill" if args.prefill else "token"
    print(f"| kernel | ms per {per} | calls per {per} |\n|---|---:|---:|")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t / args.tokens * 1e3:.3f} | {calls[name] / args.tokens:.0f} |")
    print(
        f"| all (hooked) | {sum(totals.values()) / args.tokens * 1e3:.3f} | {sum(calls.values()) / args.tokens:.0f} |"
    )
    if not args.prefill:
        print(f"wall-clock TPOT without the hook: {wall:.3f} ms")
    engine.close()


if __name__ == "__main__":
    main()
