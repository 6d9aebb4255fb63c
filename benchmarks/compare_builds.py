"""Two or more builds of one model side by side in one process: TPOT and TTFT per level, each build against the
first, in interleaved rounds (on a shared or noisy machine, builds measured in separate runs differ by more than
a kernel change does).

    python benchmarks/compare_builds.py dist/exp/before/host-cpu dist/smollm2-135m/host-cpu --rounds 30

Every round decodes `--steps` tokens at each build in turn (a round's TPOT: the fastest step) and, every fifth
round, prefills the prompt. Reported: the median over rounds, and the median of the per-round ratios to the first
build (below 1: faster). Naming a build twice measures the run-to-run scatter of loading it again.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")


def main() -> None:
    import numpy as np

    from elastilm.runtime_py.engine import ElasticEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", help="build folders (the first is the reference)")
    parser.add_argument("--levels", default="0.2,0.5,1.0")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per build and round")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    args = parser.parse_args()
    levels = [float(x) for x in args.levels.split(",")]
    engines = [ElasticEngine(b) for b in args.builds]
    prompt = engines[0].encode("The quick brown fox jumps over the lazy dog. " * 60)[: args.prompt_tokens]
    tpot = np.zeros((len(engines), len(levels), args.rounds))
    ttft = np.zeros((len(engines), len(levels), -(-args.rounds // 5)))
    for li, level in enumerate(levels):
        for engine in engines:  # warm-up, and the cache the decode steps attend over
            engine.prefill(prompt, level)
        for r in range(args.rounds):
            for bi, engine in enumerate(engines):
                if r % 5 == 0:
                    t = time.perf_counter()
                    engine.prefill(prompt, level)
                    ttft[bi, li, r // 5] = time.perf_counter() - t
                steps = []
                for i in range(args.steps):
                    t = time.perf_counter()
                    engine.decode(prompt[i], len(prompt) + i, level)
                    steps.append(time.perf_counter() - t)
                tpot[bi, li, r] = min(steps)
    at = "/".join(f"{100 * f:.0f}" for f in levels) + "%"
    print(f"| build | TPOT ms at {at} | vs first | TTFT ms at {at}, {len(prompt)} tokens | vs first |")
    print("|---|---|---|---|---|")
    for bi, build in enumerate(args.builds):
        cells = [
            " / ".join(f"{1e3 * np.median(tpot[bi, li]):.2f}" for li in range(len(levels))),
            " / ".join(f"{np.median(tpot[bi, li] / tpot[0, li]):.3f}" for li in range(len(levels))),
        ]
        pre = [
            " / ".join(f"{1e3 * np.median(ttft[bi, li]):.1f}" for li in range(len(levels))),
            " / ".join(f"{np.median(ttft[bi, li] / ttft[0, li]):.3f}" for li in range(len(levels))),
        ]
        print(f"| {build} | {cells[0]} | {cells[1]} | {pre[0]} | {pre[1]} |")
    for engine in engines:
        engine.close()


if __name__ == "__main__":
    main()
