"""Side-by-side speed and size of one elastified model built with each weight scheme (formats/quant.py), in one
run, on the same threads: prefill (a 256-token prompt) and decode tokens/s at every level, weight bytes on disk.

    python benchmarks/bench_quant.py dist/smollm2-135m --schemes q0f32,q4f32_1,q8f32_1

Builds FOLDER/host-cpu-<scheme> when missing (the fp32 build too, so all three share one compile setup). Levels
are measured in interleaved rounds (bench_runtime.bench_engine). Writes benchmarks/results/quant.{md,png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_runtime import bench_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an elastify output folder")
    parser.add_argument("--schemes", default="q0f32,q4f32_1,q8f32_1")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from elastilm.compile.build import build
    from elastilm.runtime_py.engine import ElasticEngine

    schemes = args.schemes.split(",")
    builds = {}
    for s in schemes:
        out = args.folder / f"host-cpu-{s}"
        if not (out / "manifest.json").is_file():
            build(args.folder, "host-cpu", out, quantization=s)
        builds[s] = out
    text = (Path(__file__).parent.parent / "README.md").read_text()
    results, sizes = {}, {}
    for s, out in builds.items():
        engine = ElasticEngine(out)
        prompt = engine.encode(text)[: args.prompt_tokens]
        results[s] = bench_engine(engine, prompt, args.decode_steps, args.repeat)
        sizes[s] = sum(p.stat().st_size for p in (out / "params").iterdir())
        engine.close()
    n = args.prompt_tokens
    levels = sorted(results[schemes[0]])
    lines = [
        f"Prefill ({n}-token prompt) and decode tokens/s per level and weight scheme; weights = params/ on disk "
        "(a quantized scheme quantizes the embedding / LM head too).",
        "",
        "| scheme | weights (MB) | " + " | ".join(f"{lv:.0%} prefill / decode" for lv in levels) + " |",
        "|---" * (len(levels) + 2) + "|",
    ]
    for s in schemes:
        cells = [f"{n / results[s][lv][0]:.0f} / {1 / results[s][lv][1]:.1f}" for lv in levels]
        lines.append(f"| {s} | {sizes[s] / 1e6:.0f} | " + " | ".join(cells) + " |")
    base = schemes[0]
    for s in schemes[1:]:
        lines.append(
            f"\n{s} vs {base} at full width: prefill {results[base][1.0][0] / results[s][1.0][0]:.2f}x, decode "
            f"{results[base][1.0][1] / results[s][1.0][1]:.2f}x, weights {sizes[s] / sizes[base]:.2f}x"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant.md").write_text(report)
    _plot(results, levels, schemes, args.out / "quant.png")


def _plot(results, levels, schemes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for s in schemes:
        axes[0].plot([100 * lv for lv in levels], [1 / results[s][lv][1] for lv in levels], marker="o", label=s)
        axes[1].plot([100 * lv for lv in levels], [1 / results[s][lv][0] for lv in levels], marker="o", label=s)
    axes[0].set(title="decode tokens/s", xlabel="level (% of elastic params)")
    axes[1].set(title="prefills/s (256 tokens)", xlabel="level (% of elastic params)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
