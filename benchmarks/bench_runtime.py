"""Side-by-side speed of the compiled elastic runtime, Hugging Face transformers (eager, fp32, KV cache) and,
when `llama-cpp-python` is installed, llama.cpp on the same GGUF; all in one run, on the same threads.

    python benchmarks/bench_runtime.py --build dist/smollm2-135m/host-cpu --threads 2

Reports prefill (256-token prompt) and decode tokens/s at full width, TTFT/TPOT at every level, the cost of the
first request after a level switch, and decode's distance to the DRAM-bandwidth ceiling. Writes
benchmarks/results/runtime.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def bench_engine(engine, prompt: list[int], decode_steps: int, repeat: int) -> dict:
    """Median (TTFT, TPOT) per level; levels are measured in interleaved rounds so that drifts in machine
    speed fall on every level alike."""
    levels = sorted(engine.levels)

    def decode(fraction):
        engine.prefill(prompt[:8], fraction)
        t = time.perf_counter()
        for i in range(decode_steps):
            engine.decode(prompt[i], 8 + i, fraction)
        return (time.perf_counter() - t) / decode_steps

    samples = {f: ([], []) for f in levels}
    for f in levels:  # warm-up
        engine.prefill(prompt, f)
        decode(f)
    for _ in range(repeat):
        for f in levels:
            t = time.perf_counter()
            engine.prefill(prompt, f)
            samples[f][0].append(time.perf_counter() - t)
            samples[f][1].append(decode(f))
    return {f: (statistics.median(a), statistics.median(b)) for f, (a, b) in samples.items()}


def bench_switch(engine, prompt: list[int], repeat: int) -> tuple[float, float]:
    """(steady-state TTFT at level 0.5, TTFT of the first request at 0.5 right after a request at 1.0)."""
    steady = timed(lambda: engine.prefill(prompt, 0.5), repeat)
    firsts = []
    for _ in range(repeat):
        engine.prefill(prompt, 1.0)
        t = time.perf_counter()
        engine.prefill(prompt, 0.5)
        firsts.append(time.perf_counter() - t)
    return steady, statistics.median(firsts)


def bench_hf(gguf: Path, prompt: list[int], decode_steps: int, repeat: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    @torch.no_grad()
    def prefill():
        return model(input_ids=ids, use_cache=True)

    @torch.no_grad()
    def decode():
        out = model(input_ids=ids[:, :8], use_cache=True)
        cache, token = out.past_key_values, ids[:, 8:9]
        t = time.perf_counter()
        for _ in range(decode_steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) / decode_steps

    ttft = timed(prefill, repeat)
    decode()
    return ttft, statistics.median(decode() for _ in range(repeat))


def bench_llama_cpp(gguf: Path, prompt: list[int], decode_steps: int, repeat: int, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def decode():
        llm.reset()
        llm.eval(prompt[:8])
        t = time.perf_counter()
        for i in range(decode_steps):
            llm.eval([prompt[8 + i]])
        return (time.perf_counter() - t) / decode_steps

    ttft = timed(prefill, repeat)
    decode()
    return ttft, statistics.median(decode() for _ in range(repeat))


def dram_read_bandwidth() -> float:
    """Bytes/s of torch summing 512 MB (read-only, on the benchmark's threads): what decode at best can stream."""
    import torch

    a = torch.ones(128 << 20, dtype=torch.float32)  # far beyond the caches
    seconds = timed(lambda: a.sum(), 5)
    return a.numel() * 4 / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"))
    parser.add_argument("--model", default="smollm2-135m", help="the GGUF that the build came from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from elastilm.compile.ingest import resolve
    from elastilm.runtime_py.engine import ElasticEngine

    engine = ElasticEngine(args.build)
    _, gguf = resolve(args.model)
    text = (Path(__file__).parent.parent / "README.md").read_text()
    prompt = engine.encode(text)[: args.prompt_tokens]
    levels = bench_engine(engine, prompt, args.decode_steps, args.repeat)
    steady, first = bench_switch(engine, prompt, args.repeat)
    hf = bench_hf(gguf, prompt, args.decode_steps, args.repeat)
    lcpp = bench_llama_cpp(gguf, prompt, args.decode_steps, args.repeat, args.threads)
    bandwidth = dram_read_bandwidth()

    n = len(prompt)
    full_ttft, full_tpot = levels[1.0]
    manifest = engine.manifest
    scheme = manifest["quantization"]["scheme"]
    untied = any(n.startswith("lm_head.") for n in manifest["param_names"])  # the embedding is then only gathered
    weight_bytes = sum(
        p.numpy().nbytes
        for name, p in zip(manifest["param_names"], engine.params)
        if not (untied and name.startswith("model.embed_tokens."))
    )
    ceiling = bandwidth / weight_bytes  # tokens/s if every weight byte is read once per token at this bandwidth
    lines = [
        f"{n}-token prompt, {args.decode_steps} decode steps, {args.threads} threads, median of {args.repeat}.",
        "",
        "| engine | prefill tok/s | decode tok/s | prefill vs HF | decode vs HF |",
        "|---|---:|---:|---:|---:|",
        f"| ElastiLM-TVM {scheme}, full width | {n / full_ttft:.0f} | {1 / full_tpot:.1f} | "
        f"{hf[0] / full_ttft:.2f}x | {hf[1] / full_tpot:.2f}x |",
        f"| transformers eager fp32 | {n / hf[0]:.0f} | {1 / hf[1]:.1f} | 1.00x | 1.00x |",
    ]
    if lcpp:
        lines.append(
            f"| llama.cpp ({gguf.name}, the same model) | {n / lcpp[0]:.0f} | {1 / lcpp[1]:.1f} | "
            f"{hf[0] / lcpp[0]:.2f}x | {hf[1] / lcpp[1]:.2f}x |"
        )
    else:
        lines.append("| llama.cpp | not installed (`pip install llama-cpp-python`) | | | |")
    lines += [
        "",
        "| level | TTFT ms | TPOT ms | TTFT vs full | TPOT vs full |",
        "|---:|---:|---:|---:|---:|",
    ]
    for f, (ttft, tpot) in levels.items():
        lines.append(
            f"| {f:.0%} | {ttft * 1e3:.1f} | {tpot * 1e3:.2f} | {ttft / full_ttft:.2f} | {tpot / full_tpot:.2f} |"
        )
    lines += [
        "",
        f"Level switch: TTFT at 50% steady {steady * 1e3:.1f} ms, first request after a 100% request {first * 1e3:.1f} ms "
        f"(overhead {(first - steady) / steady:+.1%} of TTFT).",
        f"Decode bandwidth: weights {weight_bytes / 1e6:.0f} MB read per token at full width; torch reads {bandwidth / 1e9:.1f} GB/s "
        f"-> ceiling {ceiling:.1f} tok/s; measured {1 / full_tpot:.1f} tok/s = {(1 / full_tpot) / ceiling:.0%} of it.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.md").write_text(report)
    with open(args.out / "runtime.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "ttft_ms", "tpot_ms"])
        for lv, (ttft, tpot) in levels.items():
            w.writerow([lv, ttft * 1e3, tpot * 1e3])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = [f * 100 for f in levels]
    a.plot(xs, [t * 1e3 for t, _ in levels.values()], "o-", label="ElastiLM-TVM")
    a.axhline(hf[0] * 1e3, color="gray", ls="--", label="transformers (full)")
    a.set(xlabel="level (% elastic params)", ylabel=f"TTFT ms ({n} tokens)", title="time to first token")
    b.plot(xs, [t * 1e3 for _, t in levels.values()], "o-", label="ElastiLM-TVM")
    b.axhline(hf[1] * 1e3, color="gray", ls="--", label="transformers (full)")
    if lcpp:
        a.axhline(lcpp[0] * 1e3, color="green", ls=":", label="llama.cpp Q4_1 (full)")
        b.axhline(lcpp[1] * 1e3, color="green", ls=":", label="llama.cpp Q4_1 (full)")
    b.set(xlabel="level (% elastic params)", ylabel="TPOT ms", title="time per output token")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "runtime.png", dpi=120)


if __name__ == "__main__":
    main()
