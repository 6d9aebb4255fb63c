"""Side-by-side speed and size of one elastified model built with each weight scheme (formats/quant.py), against
llama.cpp on the same model, in one run on the same threads.

    python benchmarks/bench_quant.py dist/smollm2-135m --schemes q0f32,q4f32_1,q4f32_mix,q8f32_1 --threads 2

Builds FOLDER/host-cpu-<scheme> when missing. Measures, 256-token prompt:
- prefill and decode tokens/s at every level per scheme (levels in interleaved rounds, bench_runtime.bench_engine);
- at full width, llama.cpp (`llama-cpp-python`, when installed) on the packaged GGUF (Q4_1) and on Q8_0 / Q4_0 made
  from it by llama.cpp's own quantizer (cached in FOLDER/llama.cpp/);
- what the recovery adapters cost: the level `--adapter-level` with its adapter vs the same build without;
- library kernel calls per decoded token (the VM's instrument hook), and decode's distance to the memory ceiling
  (weight bytes read per token / the bandwidth torch reads at, measured in the same run);
- peak resident memory of a process that serves every level (a prompt and a few tokens at each), one fresh
  process per scheme.
Writes benchmarks/results/quant.{md,png}.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import statistics
import time
from pathlib import Path

from bench_runtime import bench_engine, bench_llama_cpp, dram_read_bandwidth

LLAMA_CPP_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def llama_cpp_quantized(gguf: Path, out: Path, kind: str) -> Path | None:
    """`gguf` requantized to `kind` by llama.cpp (None without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    path = out / f"{gguf.stem}-{kind}.gguf"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[kind])
        params.allow_requantize = True  # the packaged file is Q4_1; its weights are the model we build from too
        tmp = path.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {gguf} to {kind}")
        tmp.replace(path)
    return path


def kernel_calls(engine, level: float) -> int:
    """Library kernels (not VM built-ins) one decode step runs at `level`."""
    import numpy as np
    from tvm import relax
    from tvm.runtime import load_module

    from elastilm.formats import signature

    vm = relax.VirtualMachine(load_module(str(engine.folder / engine.manifest["library"])), engine.session.device)
    calls = collections.Counter()

    def count(func, name, before, ret, *args):
        if before and not name.startswith("vm."):
            calls[name] += 1
        return 0

    vm.set_instrument(count)
    lv = engine.levels[level]
    s = engine.session
    embeddings = engine.functions[signature.EMBED](s.tensor(np.array([1], "int32")), engine.params)
    args = signature.arguments(
        embeddings=embeddings,
        caches=engine.caches,
        adapters=engine.adapters.get(lv.fraction, engine.no_adapter),
        past=s.shape(4),
        heads=s.shape(lv.heads),
        neuron_blocks=s.shape(lv.neuron_blocks(engine.manifest["neuron_block"])),
    )
    vm["decode"](*args, engine.params)
    return sum(calls.values())


def adapter_cost(build: Path, prompt: list[int], level: float, decode_steps: int, repeat: int):
    """Median (TTFT, TPOT) at `level` with its adapter and without, in interleaved rounds: {True: .., False: ..}."""
    from elastilm.runtime_py.engine import ElasticEngine

    engines = {use: ElasticEngine(build, adapters=use) for use in (True, False)}
    samples = {use: ([], []) for use in engines}

    def run(engine):
        t = time.perf_counter()
        engine.prefill(prompt, level)
        ttft = time.perf_counter() - t
        engine.prefill(prompt[:8], level)
        t = time.perf_counter()
        for i in range(decode_steps):
            engine.decode(prompt[i], 8 + i, level)
        return ttft, (time.perf_counter() - t) / decode_steps

    for engine in engines.values():
        run(engine)  # warm-up
    for _ in range(repeat):
        for use, engine in engines.items():
            ttft, tpot = run(engine)
            samples[use][0].append(ttft)
            samples[use][1].append(tpot)
    for engine in engines.values():
        engine.close()
    return {use: (statistics.median(a), statistics.median(b)) for use, (a, b) in samples.items()}


SERVE_EVERY_LEVEL = """
import json, sys
from pathlib import Path
from elastilm.runtime_py.engine import ElasticEngine

prompt = json.loads(sys.argv[2])
engine = ElasticEngine(Path(sys.argv[1]))
for level in engine.levels:
    engine.prefill(prompt, level)
    for i in range(4):
        engine.decode(prompt[i], len(prompt) + i, level)
# the peak of this process's own memory (ru_maxrss would carry the parent's peak over from the fork)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def serving_peak_rss(build: Path, prompt: list[int]) -> int:
    """Peak resident bytes of a fresh Python process that loads `build` and answers at every level (nothing but
    the runtime imported, and TVM's runtime library alone, as `elastilm serve` loads it: what a serving process
    holds)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", SERVE_EVERY_LEVEL, str(build), json.dumps(prompt)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"},
    )
    return int(out.stdout.split()[-1])


def weight_bytes(build: Path) -> int:
    """Bytes of the model weights in params/ (the shards; adapters are counted apart by the manifest)."""
    import json

    cache = json.loads((build / "params" / "tensor-cache.json").read_text())
    return sum(
        r["nbytes"] for shard in cache["records"] for r in shard["records"] if not r["name"].startswith("adapter/")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an elastify output folder")
    parser.add_argument("--schemes", default="q0f32,q4f32_1,q4f32_mix,q8f32_1")
    parser.add_argument("--model", default="smollm2-135m", help="the GGUF that the folder came from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--adapter-level", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--memory-only", action="store_true", help="only the peak RSS serving every level")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from elastilm.compile.build import build
    from elastilm.compile.ingest import resolve
    from elastilm.runtime_py.engine import ElasticEngine

    schemes = args.schemes.split(",")
    builds = {}
    for s in schemes:
        out = args.folder / f"host-cpu-{s}"
        if not (out / "manifest.json").is_file():
            build(args.folder, "host-cpu", out, quantization=s)
        builds[s] = out
    text = (Path(__file__).parent.parent / "README.md").read_text()
    if args.memory_only:
        engine = ElasticEngine(builds[schemes[0]])
        prompt = engine.encode(text)[: args.prompt_tokens]
        engine.close()
        rss = {s: serving_peak_rss(out, prompt) for s, out in builds.items()}
        print(f"Peak resident memory of a process serving all levels ({len(prompt)}-token prompt at each):")
        for s in schemes:
            print(f"- {s}: {rss[s] / 2**20:.0f} MiB ({rss[s] / rss[schemes[0]]:.2f}x {schemes[0]})")
        return
    results, sizes, calls = {}, {}, {}
    prompt = None
    for s, out in builds.items():
        engine = ElasticEngine(out)
        prompt = engine.encode(text)[: args.prompt_tokens]
        results[s] = bench_engine(engine, prompt, args.decode_steps, args.repeat)
        sizes[s] = weight_bytes(out)
        calls[s] = {lv: kernel_calls(engine, lv) for lv in (1.0, args.adapter_level)}
        engine.close()
    _, gguf = resolve(args.model)
    lcpp = {"Q4_1": gguf} | {k: llama_cpp_quantized(gguf, args.folder / "llama.cpp", k) for k in LLAMA_CPP_TYPES}
    lcpp_speed = {
        k: bench_llama_cpp(path, prompt, args.decode_steps, args.repeat, args.threads)
        for k, path in lcpp.items()
        if path is not None
    }
    lcpp_speed = {k: v for k, v in lcpp_speed.items() if v is not None}
    adapters = {
        s: adapter_cost(out, prompt, args.adapter_level, args.decode_steps, args.repeat) for s, out in builds.items()
    }
    bandwidth = dram_read_bandwidth()
    rss = {s: serving_peak_rss(out, prompt) for s, out in builds.items()}

    n = len(prompt)
    levels = sorted(results[schemes[0]])
    lines = [
        f"{n}-token prompt, {args.decode_steps} decode steps, {args.threads} threads, median of {args.repeat} "
        "interleaved rounds; weights = model weights in params/ (adapters apart).",
        "",
        "| engine | weights (MB) | prefill tok/s | decode tok/s | decode: bytes/token at the measured bandwidth |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in schemes:
        ttft, tpot = results[s][1.0]
        ceiling = bandwidth / sizes[s]
        lines.append(
            f"| ElastiLM-TVM {s}, full width | {sizes[s] / 1e6:.0f} | {n / ttft:.0f} | {1 / tpot:.1f} | "
            f"{(1 / tpot) / ceiling:.0%} of {ceiling:.0f} tok/s |"
        )
    for k, (ttft, tpot) in lcpp_speed.items():
        size = lcpp[k].stat().st_size
        lines.append(f"| llama.cpp {k} | {size / 1e6:.0f} (file) | {n / ttft:.0f} | {1 / tpot:.1f} | |")
    if not lcpp_speed:
        lines.append("| llama.cpp | not installed (`pip install -e '.[bench]'`) | | | |")
    lines.append(f"\nMemory: torch reads {bandwidth / 1e9:.1f} GB/s on these threads.")
    for s in schemes[1:]:
        for k in ("Q4_1", "Q4_0") if s.startswith("q4") else ("Q8_0",):
            if k in lcpp_speed:
                lt, ld = lcpp_speed[k]
                ot, od = results[s][1.0]
                lines.append(f"\n{s} vs llama.cpp {k} at full width: prefill {lt / ot:.2f}x, decode {ld / od:.2f}x")
    lines += [
        "",
        "Prefill / decode tokens/s per level:",
        "",
        "| scheme | " + " | ".join(f"{lv:.0%}" for lv in levels) + " |",
        "|---" * (len(levels) + 1) + "|",
    ]
    for s in schemes:
        cells = [f"{n / results[s][lv][0]:.0f} / {1 / results[s][lv][1]:.1f}" for lv in levels]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "TTFT and TPOT at 20% relative to full width:", ""]
    for s in schemes:
        lo, full = results[s][min(levels)], results[s][1.0]
        lines.append(f"- {s}: TTFT {lo[0] / full[0]:.2f}, TPOT {lo[1] / full[1]:.2f}")
    lv = args.adapter_level
    lines += [
        "",
        f"What the adapters cost at {lv:.0%} (the same build, with its adapter vs without):",
        "",
        "| scheme | TTFT ms with / without | TTFT cost | TPOT ms with / without | TPOT cost | kernels per decoded token (100% / "
        f"{lv:.0%}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in schemes:
        (tw, dw), (to, do) = adapters[s][True], adapters[s][False]
        lines.append(
            f"| {s} | {tw * 1e3:.1f} / {to * 1e3:.1f} | {tw / to - 1:+.1%} | {dw * 1e3:.2f} / {do * 1e3:.2f} | "
            f"{dw / do - 1:+.1%} | {calls[s][1.0]} / {calls[s][lv]} |"
        )
    lines += ["", "Peak resident memory of a process serving all levels (a fresh process per build):", ""]
    for s in schemes:
        lines.append(f"- {s}: {rss[s] / 2**20:.0f} MiB ({rss[s] / rss[schemes[0]]:.2f}x {schemes[0]})")
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant.md").write_text(report)
    _plot(results, levels, schemes, lcpp_speed, n, args.out / "quant.png")


def _plot(results, levels, schemes, lcpp_speed, n, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for s in schemes:
        axes[0].plot([100 * lv for lv in levels], [1 / results[s][lv][1] for lv in levels], marker="o", label=s)
        axes[1].plot([100 * lv for lv in levels], [n / results[s][lv][0] for lv in levels], marker="o", label=s)
    for (k, (ttft, tpot)), style in zip(lcpp_speed.items(), (":", "--", "-.")):
        axes[0].axhline(1 / tpot, color="gray", ls=style, label=f"llama.cpp {k} (full)")
        axes[1].axhline(n / ttft, color="gray", ls=style, label=f"llama.cpp {k} (full)")
    axes[0].set(title="decode tokens/s", xlabel="level (% of elastic params)")
    axes[1].set(title=f"prefill tokens/s ({n}-token prompt)", xlabel="level (% of elastic params)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
