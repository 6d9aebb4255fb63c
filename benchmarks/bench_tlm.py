"""The TLM's cost against the full model's TTFT, for one request with a 512-token prompt, measured side by side.

    python benchmarks/bench_tlm.py --build dist/smollm2-135m/host-cpu

A request pays for the TLM twice before its first token: one decision over the query (one short window) and,
when the plan compresses, scoring the compressible context (ceil(tokens / 126) windows of 128). Both are timed here with the
compiled TLM and, for comparison, the torch TLM, interleaved in rounds with the full model's prefill of the same
512 tokens (context + query), so drifts in machine speed fall on all alike. Writes
benchmarks/results/tlm-overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from elastilm.compile import corpus
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.runtime_py.tlm import CompiledTLM
from elastilm.train.train_tlm import TorchTLM

QUERY = "Question: Which point of the essay above matters most, and why?\nAnswer:"


def prompt(engine, tokens: int) -> tuple[str, str]:
    """(context, query) with `tokens` LLM tokens in all: held-out essay text cut to fit."""
    text = corpus.split_files("heldout")[0].read_text(encoding="utf-8", errors="replace")
    need = tokens - len(engine.encode(QUERY))
    enc = engine.tokenizer.encode(text, add_special_tokens=False)
    context = text[: enc.offsets[need - 1][1]]
    assert len(engine.encode(context)) + len(engine.encode(QUERY)) == tokens, "context does not split where cut"
    return context, QUERY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"))
    parser.add_argument(
        "--folder", type=Path, default=None, help="elastify folder with the trained TLM (default: the build's parent)"
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    engine = ElasticEngine(args.build)
    compiled = CompiledTLM(args.build / "tlm")
    reference = TorchTLM.from_folder(args.folder or args.build.parent)
    context, query = prompt(engine, args.tokens)
    ids = engine.encode(context) + engine.encode(query)

    def tlm_request(tlm):
        tlm.decide(query, 0.4, 0.7)
        tlm.token_scores(context)

    runs = {
        "full model TTFT": lambda: engine.prefill(ids, 1.0),
        "TLM (TVM)": lambda: tlm_request(compiled),
        "TLM (torch)": lambda: tlm_request(reference),
    }
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeat):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            samples[name].append(1000 * (time.perf_counter() - t))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    windows = len(compiled.windows(context))
    full = ms["full model TTFT"]
    doc = {
        "prompt_tokens": args.tokens,
        "score_windows": windows,
        "repeat": args.repeat,
        "median_ms": ms,
        "ratio_tvm": ms["TLM (TVM)"] / full,
        "ratio_torch": ms["TLM (torch)"] / full,
        "tlm_layers": compiled.meta["layers"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tlm-overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"TLM cost per request with a {args.tokens}-token prompt: one decision ({compiled.decide_window}-token window) "
        f"+ scoring the context ({windows} windows of {compiled.window}), median of {args.repeat} interleaved rounds.",
        "",
        "| | ms | share of full-model TTFT |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} | {v / full:.1%} |" for k, v in ms.items()]
    (args.out / "tlm-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    engine.close()


if __name__ == "__main__":
    main()
