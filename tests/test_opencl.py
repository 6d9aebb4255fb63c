"""OpenCL kernels: scheduled as the presets schedule them, compiled by PoCL, run on PoCL against numpy."""

import numpy as np
import pytest
import tvm
from conftest import POISON, numpy_attention
from tvm import te, tirx
from tvm.s_tir import dlight as dl

from elastilm.compile.export import kernel_layout
from elastilm.compile.quantize import dequantize, quantize
from elastilm.elastic_ops import pocl, prefix, schedule_gpu
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.quant import Format, scheme
from elastilm.targets import preset

I64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731

pytestmark = pytest.mark.usefixtures("pocl_platform")

# adreno-opencl takes dlight's Android variants, x86-opencl the generic ones: both must be right
PRESETS = ["adreno-opencl", "x86-opencl"]


def scheduled(tensors, target):
    mod = tvm.IRModule({"main": te.create_prim_func(tensors)})
    with target:
        return dl.ApplyDefaultSchedule(*schedule_gpu.rules())(mod)["main"]


def strips(rng, rows, cols, active_rows, active_cols):
    """A weight (rows, cols) with NaN outside the active prefix, packed as the kernels read it."""
    full = np.full((rows, cols), np.nan, "float32")
    full[:active_rows, :active_cols] = rng.standard_normal((active_rows, active_cols))
    return full, np.ascontiguousarray(kernel_layout("mlp.up_proj.weight", full))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tokens,blocks,active_in", [(1, 3, 96), (5, 2, 37), (7, 1, 1)])
def test_prefix_matmul_on_pocl(name, tokens, blocks, active_in):
    target = preset(name).tvm_target()
    rng = np.random.default_rng(tokens * blocks)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb, k_in = tirx.Var("nb", "int64"), tirx.Var("k", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    w = te.placeholder((I64(3), I64(96), I64(64)), "float32", name="w")
    fn = scheduled([x, w, prefix.prefix_matmul(x, w, nb * 64, name="up_proj"), nb], target)
    full, packed = strips(rng, 192, 96, blocks * 64, active_in)
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    out = pocl.run(
        fn,
        target,
        {"x": xs, "w": packed, "up_proj_out": np.full((tokens, blocks * 64), np.nan, "float32")},
        {"nb": blocks},
    )
    np.testing.assert_allclose(out["up_proj_out"], xs @ full[: blocks * 64, :active_in].T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tokens,blocks", [(1, 1), (3, 3), (6, 2)])
def test_ffn_chain_on_pocl(name, tokens, blocks):
    """up, then gate fused with SiLU*up, then down over the active neurons plus the residual: the model's fusion."""
    target = preset(name).tvm_target()
    rng = np.random.default_rng(10 + tokens)
    d, f = 48, 192
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb = tirx.Var("nb", "int64")
    x = te.placeholder((T, I64(d)), "float32", name="x")
    wu = te.placeholder((I64(f // 64), I64(d), I64(64)), "float32", name="wu")
    wg = te.placeholder((I64(f // 64), I64(d), I64(64)), "float32", name="wg")
    up_in = te.placeholder((T, nb * 64), "float32", name="up")
    act_in = te.placeholder((T, tirx.Var("k", "int64")), "float32", name="act")  # its width is read from the shape
    wd = te.placeholder(
        (I64(1), I64(f), I64(d)), "float32", name="wd"
    )  # (d, f) in one strip: d is not a multiple of 64
    up = scheduled([x, wu, prefix.prefix_matmul(x, wu, nb * 64, name="up_proj"), nb], target)
    gate_act = scheduled(
        [x, wg, up_in, prefix.silu_mul(prefix.prefix_matmul(x, wg, nb * 64, name="gate_proj"), up_in), nb], target
    )
    down = scheduled(
        [
            act_in,
            wd,
            x,
            te.compute(
                (T, I64(d)),
                lambda t, i: prefix.prefix_matmul(act_in, wd, name="down_proj")[t, i] + x[t, i],
                name="residual",
            ),
        ],
        target,
    )

    u_full, u_packed = strips(rng, f, d, blocks * 64, d)
    g_full, g_packed = strips(rng, f, d, blocks * 64, d)
    d_full = np.full((d, f), np.nan, "float32")
    d_full[:, : blocks * 64] = rng.standard_normal((d, blocks * 64)) / 8
    xs = rng.standard_normal((tokens, d)).astype("float32")
    poison = lambda shape: np.full(shape, np.nan, "float32")  # noqa: E731

    u = pocl.run(up, target, {"x": xs, "wu": u_packed, "up_proj_out": poison((tokens, blocks * 64))}, {"nb": blocks})[
        "up_proj_out"
    ]
    a = pocl.run(
        gate_act, target, {"x": xs, "wg": g_packed, "up": u, "silu_mul": poison((tokens, blocks * 64))}, {"nb": blocks}
    )["silu_mul"]
    y = pocl.run(
        down,
        target,
        {
            "act": a,
            "wd": np.ascontiguousarray(kernel_layout("mlp.down_proj.weight", d_full)),
            "x": xs,
            "residual": poison((tokens, d)),
        },
        {},
    )["residual"]

    gate, upv = xs @ g_full[: blocks * 64].T, xs @ u_full[: blocks * 64].T
    expected = (gate / (1 + np.exp(-gate)) * upv) @ d_full[:, : blocks * 64].T + xs
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tokens,past,heads,group", [(5, 0, 5, None), (1, 9, 3, None), (4, 3, 6, 3)])
def test_attention_on_pocl(name, tokens, past, heads, group):
    """Cache rows past past+T hold large finite garbage, which the mask must keep out."""
    target = preset(name).tvm_target()
    rng = np.random.default_rng(tokens + past + heads)
    hd, n_kv, rows = 8, 2, 64
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    p = tirx.Var("past", "int64")
    q = te.placeholder((T, I64(heads * hd)), "float32", name="q")
    kt = te.placeholder((I64(n_kv * hd), I64(rows)), "float32", name="kt")
    v = te.placeholder((I64(rows), I64(n_kv * hd)), "float32", name="v")
    fn = scheduled([q, kt, v, prefix.attention(q, kt, v, p, hd, n_kv, group), p], target)
    S = past + tokens
    qs = rng.standard_normal((tokens, heads * hd)).astype("float32")
    k_all, v_all = np.full((rows, n_kv * hd), 1e30, "float32"), np.full((rows, n_kv * hd), 1e30, "float32")
    k_all[:S], v_all[:S] = rng.standard_normal((S, n_kv * hd)), rng.standard_normal((S, n_kv * hd))
    arrays = {
        "q": qs,
        "kt": np.ascontiguousarray(k_all.T),
        "v": v_all,
        "attention": np.full((tokens, heads * hd), np.nan, "float32"),
    }
    out = pocl.run(fn, target, arrays, {"past": past})
    np.testing.assert_allclose(
        out["attention"], numpy_attention(qs, k_all, v_all, past, heads, hd, n_kv, group), rtol=1e-4, atol=1e-5
    )


def test_check_catches_invalid_opencl_that_tvm_accepts():
    """docs/tvm-notes.md section 9: dlight's Matmul with an Android host writes a statement inside `vstore8(` for a
    q.k product with a symbolic query count and a static key count. TVM builds it without complaint."""
    target = preset("adreno-opencl").tvm_target()
    n = tirx.Var("n", "int64")
    q = te.placeholder((I64(9), n, I64(64)), "float32", name="q")
    k = te.placeholder((I64(9), I64(256), I64(64)), "float32", name="k")
    d = te.reduce_axis((I64(0), I64(64)), "d")
    qk = te.compute((I64(9), n, I64(256)), lambda h, i, j: te.sum(q[h, i, d] * k[h, j, d], axis=d), name="qk")
    with target:
        fn = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(tvm.IRModule({"main": te.create_prim_func([q, k, qk])}))["main"]
    fn = fn.with_attr("global_symbol", "qk")
    source = pocl.opencl_source(tvm.tirx.build(fn, target=target))
    assert "vstore8(" in source
    with pytest.raises(ElastiLMError, match="do not compile"):
        pocl.compile_source(source)
    # the workaround docs/tvm-notes.md section 9 names: without vectorised stores the same schedule is valid OpenCL C
    with tvm.transform.PassContext(config={"tirx.disable_vectorize": True}):
        pocl.compile_source(pocl.opencl_source(tvm.tirx.build(fn, target=target)))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tokens,active_in,rows,rank", [(1, 96, 64, 8), (5, 37, 13, 8), (3, 1, 1, 3), (1, 96, 64, 1)])
def test_lora_on_prefix_on_pocl(name, tokens, active_in, rows, rank):
    """The adapter update on a prefix, scheduled by the guarded dlight rules (GeneralReduction fails on this
    two-reduction chain and is passed over), against numpy with NaN outside the prefix; the rank is the call's
    (1: a level without an adapter on a GPU, where OpenCL has no empty buffers)."""
    target = preset(name).tvm_target()
    rng = np.random.default_rng(tokens + rows)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    k_in, m = tirx.Var("k", "int64"), tirx.Var("m", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    y = te.placeholder((T, m), "float32", name="y")
    r = tirx.Var("r", "int64")
    a = te.placeholder((r, I64(96)), "float32", name="a")
    bt = te.placeholder((I64(1), r, I64(64)), "float32", name="bt")  # B^T strips (kernel_layout)
    fn = scheduled([x, y, a, bt, prefix.lora_prefix(x, y, a, bt)], target)
    a_full, b_full = np.full((rank, 96), np.nan, "float32"), np.full((64, rank), np.nan, "float32")
    a_full[:, :active_in] = rng.standard_normal((rank, active_in))
    b_full[:rows] = rng.standard_normal((rows, rank))
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    ys = rng.standard_normal((tokens, rows)).astype("float32")
    bt_packed = np.ascontiguousarray(kernel_layout("mlp.up_proj.lora_B", b_full))
    out = pocl.run(
        fn,
        target,
        {"x": xs, "y": ys, "a": a_full, "bt": bt_packed, "lora_out": np.full((tokens, rows), np.nan, "float32")},
        {},
    )
    np.testing.assert_allclose(
        out["lora_out"], ys + xs @ a_full[:, :active_in].T @ b_full[:rows].T, rtol=1e-4, atol=1e-4
    )


MIX = scheme("q4f32_mix")  # the demo's scheme: its formats store fp16 scales and minima as uint16 bits
QUANT_FORMATS = [Format(4), Format(8), Format(4, asymmetric=True), MIX.linear, MIX.down_proj]


def quantized_poisoned(rng, rows, cols, active_rows, active_in, fmt):
    """A weight (rows, cols) quantized in `fmt` with garbage words and NaN scales / minima outside the active
    prefix; (the arrays by kernel name q, s, m, the active prefix dequantized)."""
    w = (rng.standard_normal((rows, cols)) + rng.uniform(-1, 1, (rows, 1))).astype("float32")
    packed = quantize(w, fmt)
    strip = packed[0].shape[2]
    cuts = (active_in // fmt.per_word, active_in // fmt.group, active_in // fmt.group)
    for a, cut in zip(packed, cuts):
        bad = POISON.get(a.dtype, np.nan)
        a[:, cut:, :] = bad
        a[active_rows // strip :] = bad
    deq = dequantize(tuple(a[: active_rows // strip, :cut] for a, cut in zip(packed, cuts)), fmt)
    return dict(zip(("q", "s", "m"), packed)), deq


def quantized_placeholders(arrays: dict) -> list:
    return [te.placeholder(tuple(I64(d) for d in a.shape), str(a.dtype), name=n) for n, a in arrays.items()]


def quantized_matmul(x, ps, fmt, rows, name):
    return prefix.prefix_matmul_q(x, ps[0], ps[1], fmt, rows, name=name, minimum=ps[2] if len(ps) > 2 else None)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize(
    "fmt", QUANT_FORMATS, ids=lambda f: f"{f.bits}bit-{'asym' if f.asymmetric else 'sym'}{'-f16' if f.half else ''}"
)
@pytest.mark.parametrize("tokens,blocks,active_in", [(1, 3, 96), (5, 2, 32), (1, 1, 160), (6, 1, 64)])
def test_quantized_prefix_matmul_on_pocl(name, fmt, tokens, blocks, active_in):
    """The dequantizing prefix matmul as the GPU presets schedule it: decode (per-group partial sums) and prefill
    (a dequantized strip), reading only the active prefix."""
    target = preset(name).tvm_target()
    rng = np.random.default_rng(tokens * blocks + active_in)
    arrays, deq = quantized_poisoned(rng, 192, 160, blocks * 64, active_in, fmt)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb, k_in = tirx.Var("nb", "int64"), tirx.Var("k", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    ps = quantized_placeholders(arrays)
    fn = scheduled([x, *ps, quantized_matmul(x, ps, fmt, nb * 64, "up_proj"), nb], target)
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    out = pocl.run(
        fn,
        target,
        {"x": xs, **arrays, "up_proj_out": np.full((tokens, blocks * 64), np.nan, "float32")},
        {"nb": blocks},
    )
    np.testing.assert_allclose(out["up_proj_out"], xs @ deq.T, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("vocab", [192, 97])
def test_quantized_lm_head_and_embedding_on_pocl(name, vocab):
    """The 8-bit tied table of q4f32_mix: the LM head over all rows (one strip of an odd vocabulary too) and the
    gather of a few rows."""
    fmt = MIX.embedding
    target = preset(name).tvm_target()
    rng = np.random.default_rng(vocab)
    arrays, table = quantized_poisoned(rng, vocab, 64, vocab, 64, fmt)
    h = te.placeholder((I64(1), I64(64)), "float32", name="h")
    ps = quantized_placeholders(arrays)
    head = scheduled([h, *ps, prefix.prefix_matmul_q(h, ps[0], ps[1], fmt, name="lm_head")], target)
    hs = rng.standard_normal((1, 64)).astype("float32")
    logits = pocl.run(head, target, {"h": hs, **arrays, "lm_head_out": np.full((1, vocab), np.nan, "float32")}, {})
    np.testing.assert_allclose(logits["lm_head_out"], hs @ table.T, rtol=1e-4, atol=2e-4)
    n = tirx.Var("n", "int64")
    ids = te.placeholder((n,), "int32", name="ids")
    gather = scheduled([ids, *ps, prefix.embed_q(ids, ps[0], ps[1], fmt)], target)
    picked = np.array([3, vocab - 1, 0, 3], "int32")
    rows = pocl.run(gather, target, {"ids": picked, **arrays, "embed": np.full((4, 64), np.nan, "float32")}, {})
    np.testing.assert_allclose(rows["embed"], table[picked], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tokens,blocks", [(1, 1), (4, 3)])
def test_quantized_ffn_chain_on_pocl(name, tokens, blocks):
    """q4f32_mix's FFN: gate and up in asymmetric 4-bit, down_proj in 8-bit over the active neurons, plus the
    residual, each kernel as the GPU presets schedule it."""
    target = preset(name).tvm_target()
    rng = np.random.default_rng(20 + tokens)
    d, f = 64, 192
    asym, eight = MIX.linear, MIX.down_proj
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb = tirx.Var("nb", "int64")
    g_arrays, g_deq = quantized_poisoned(rng, f, d, blocks * 64, d, asym)
    u_arrays, u_deq = quantized_poisoned(rng, f, d, blocks * 64, d, asym)
    d_arrays, d_deq = quantized_poisoned(rng, d, f, d, blocks * 64, eight)
    x = te.placeholder((T, I64(d)), "float32", name="x")
    gp, up_ps = quantized_placeholders(g_arrays), quantized_placeholders(u_arrays)
    up_in = te.placeholder((T, nb * 64), "float32", name="up")
    act_in = te.placeholder((T, tirx.Var("k", "int64")), "float32", name="act")
    dp = quantized_placeholders(d_arrays)
    up = scheduled([x, *up_ps, quantized_matmul(x, up_ps, asym, nb * 64, "up_proj"), nb], target)
    gate_act = scheduled(
        [x, *gp, up_in, prefix.silu_mul(quantized_matmul(x, gp, asym, nb * 64, "gate_proj"), up_in), nb], target
    )
    residual = te.compute(
        (T, I64(d)), lambda t, i: quantized_matmul(act_in, dp, eight, None, "down_proj")[t, i] + x[t, i], name="res"
    )
    down = scheduled([act_in, *dp, x, residual], target)
    xs = rng.standard_normal((tokens, d)).astype("float32")
    poison = lambda shape: np.full(shape, np.nan, "float32")  # noqa: E731
    rename = lambda arrays, names: dict(zip(names, arrays.values()))  # noqa: E731
    u = pocl.run(up, target, {"x": xs, **u_arrays, "up_proj_out": poison((tokens, blocks * 64))}, {"nb": blocks})
    a = pocl.run(
        gate_act,
        target,
        {"x": xs, **g_arrays, "up": u["up_proj_out"], "silu_mul": poison((tokens, blocks * 64))},
        {"nb": blocks},
    )["silu_mul"]
    y = pocl.run(down, target, {"act": a, **rename(d_arrays, ("q", "s")), "x": xs, "res": poison((tokens, d))}, {})
    gate, upv = xs @ g_deq.T, xs @ u_deq.T
    expected = (gate / (1 + np.exp(-gate)) * upv) @ d_deq.T + xs
    np.testing.assert_allclose(y["res"], expected, rtol=1e-4, atol=5e-4)
