"""Single decode kernels compiled alone for this CPU (our schedules) and timed with TVM's time_evaluator: attention
over a cache at several active heads and positions, and the quantized GEMV of each weight format at SmolLM2's
projection shapes. Inputs are random; weights stay in cache, so the GB/s is the kernel's unpacking rate, not
the memory's.

    python benchmarks/bench_kernels.py --threads 2

Run it on the code before and after a kernel change (e.g. `git stash`) to see the change alone
(docs/tvm-notes.md sections 19-21 were measured this way).
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", default="1,3,9", help="active query heads (of SmolLM2's 9, 3 KV heads)")
    parser.add_argument("--past", default="32,256,512", help="positions already in the cache")
    parser.add_argument("--number", type=int, default=200, help="calls per timing; the median of 9 is shown")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    target = tvm.target.Target.from_device(tvm.cpu())

    def timed(fn, *arrays) -> float:
        return fn.time_evaluator("main", tvm.cpu(), number=args.number, repeat=9)(*arrays).median

    fn, (kt, v) = _attention(target)
    print(f"decode attention (us), {args.threads} threads, head dim 64, cache of 2048 rows")
    pasts = [int(p) for p in args.past.split(",")]
    print("| heads | " + " | ".join(f"after {p}" for p in pasts) + " |")
    print("|---:|" + "---:|" * len(pasts))
    K, V = (tvm.runtime.tensor(rng.standard_normal(a).astype("float32")) for a in (kt, v))
    for heads in (int(h) for h in args.heads.split(",")):
        q = tvm.runtime.tensor(rng.standard_normal((1, heads * 64)).astype("float32"))
        out = tvm.runtime.tensor(np.zeros((1, heads * 64), "float32"))
        cells = [f"{1e6 * timed(fn, q, K, V, out, past, heads):.1f}" for past in pasts]
        print(f"| {heads} | " + " | ".join(cells) + " |")

    print(f"\nquantized decode GEMV, {args.threads} threads, one token, full width")
    print("| format | shape (out x in) | us | G weights/s | GB/s |")
    print("|---|---|---:|---:|---:|")
    for label, fmt, rows, cols in _gemvs():
        fn, arrays = _gemv(target, fmt, rows, cols, rng)
        seconds = timed(fn, *arrays)
        stored = rows * cols * (fmt.bits + (2 if fmt.asymmetric else 1) * (16 if fmt.half else 32) / fmt.group) / 8
        print(
            f"| {label} | {rows} x {cols} | {1e6 * seconds:.1f} | {rows * cols / seconds / 1e9:.1f} "
            f"| {stored / seconds / 1e9:.1f} |"
        )


def _attention(target):
    """Decode attention (one token) over caches of 2048 rows, 3 KV heads of 64; heads and past symbolic."""
    from functools import partial

    import tvm
    from tvm import te, tirx

    from elastilm.elastic_ops import prefix, schedule_cpu

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    rows, n_kv, hd = 2048, 3, 64
    heads, past = tirx.Var("heads", "int64"), tirx.Var("past", "int64")
    q = te.placeholder((i64(1), heads * hd), "float32", name="q")
    kt = te.placeholder((i64(n_kv * hd), i64(rows)), "float32", name="kt")
    v = te.placeholder((i64(rows), i64(n_kv * hd)), "float32", name="v")
    out = prefix.attention(q, kt, v, past, hd, n_kv, None)
    mod = tvm.IRModule({"main": te.create_prim_func([q, kt, v, out, past, heads])})
    rule = partial(schedule_cpu.schedule_function, budget=schedule_cpu.accumulators(target))
    fn = tvm.compile(schedule_cpu.schedule_module(mod, rule), target=target).mod
    return fn, ((n_kv * hd, rows), (rows, n_kv * hd))


def _gemvs():
    from elastilm.formats.quant import SCHEMES

    mix = SCHEMES["q4f32_mix"]
    return [
        ("q4f32_mix gate/up (4-bit asymmetric)", mix.format("mlp.gate_proj"), 1536, 576),
        ("q4f32_mix q/o (4-bit asymmetric)", mix.format("self_attn.q_proj"), 576, 576),
        ("q4f32_mix down_proj (8-bit)", mix.format("mlp.down_proj"), 576, 1536),
        ("q4f32_1 gate/up (4-bit symmetric)", SCHEMES["q4f32_1"].format("mlp.gate_proj"), 1536, 576),
        ("q8f32_1 gate/up (8-bit symmetric)", SCHEMES["q8f32_1"].format("mlp.gate_proj"), 1536, 576),
    ]


def _gemv(target, fmt, rows: int, cols: int, rng):
    """The compiled one-token `prefix_matmul_q` of a (rows, cols) weight in `fmt`, and random arguments for it."""
    from functools import partial

    import numpy as np
    import tvm
    from tvm import te, tirx

    from elastilm.elastic_ops import prefix, schedule_cpu

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    strips, groups = rows // prefix.STRIP, (i64(rows // prefix.STRIP), i64(cols // fmt.group), i64(prefix.STRIP))
    blocks = tirx.Var("blocks", "int64")
    x = te.placeholder((i64(1), i64(cols)), "float32", name="x")
    q = te.placeholder((i64(strips), i64(cols // fmt.per_word), i64(prefix.STRIP)), "uint32", name="q")
    scale = te.placeholder(groups, fmt.scale_dtype, name="scale")
    minimum = te.placeholder(groups, fmt.scale_dtype, name="minimum") if fmt.asymmetric else None
    y = prefix.prefix_matmul_q(x, q, scale, fmt, blocks * prefix.STRIP, name="gate_proj", minimum=minimum)
    tensors = [x, q, scale, *([minimum] if minimum is not None else []), y, blocks]
    mod = tvm.IRModule({"main": te.create_prim_func(tensors)})
    rule = partial(schedule_cpu.schedule_function, budget=schedule_cpu.accumulators(target))
    fn = tvm.compile(schedule_cpu.schedule_module(mod, rule), target=target).mod
    shape = tuple(int(d) for d in groups)
    one = np.full(shape, 0x3C00, "uint16") if fmt.half else np.ones(shape, "float32")  # 1.0 as fp16 bits
    words = rng.integers(0, 2**32, (strips, cols // fmt.per_word, prefix.STRIP), dtype=np.uint64).astype("uint32")
    arrays = [rng.standard_normal((1, cols)).astype("float32"), words, one] + ([one] if fmt.asymmetric else [])
    arrays = [tvm.runtime.tensor(a) for a in arrays]
    return fn, [*arrays, tvm.runtime.tensor(np.zeros((1, rows), "float32")), strips]


if __name__ == "__main__":
    main()
