"""Single elastic operators, compiled alone for the host CPU, against numpy at several (odd) widths."""

from functools import partial

import numpy as np
import pytest
import tvm
from conftest import numpy_attention
from tvm import te, tirx

from elastilm.compile.export import kernel_layout
from elastilm.elastic_ops import prefix, schedule_cpu

I64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731  (Relax hands kernels int64 shapes)
TARGET = tvm.target.Target.from_device(tvm.cpu())


# register tile budgets (schedule_cpu.accumulators): AVX-512's, and AVX2's / NEON's, whatever this host has
BUDGETS = [schedule_cpu.AVX512_ACCUMULATORS, 64]


def compile_te(tensors, scheduled: bool | int):
    """The kernel of `tensors`, with our CPU schedule (its tiles for `scheduled` accumulators when a number)."""
    mod = tvm.IRModule({"main": te.create_prim_func(tensors)})
    if scheduled:
        budget = schedule_cpu.AVX512_ACCUMULATORS if scheduled is True else scheduled
        mod = schedule_cpu.schedule_module(mod, partial(schedule_cpu.schedule_function, budget=budget))
    return tvm.compile(mod, target=TARGET)["main"]


def poisoned(shape):
    return tvm.runtime.tensor(np.full(shape, np.nan, "float32"))


@pytest.mark.parametrize("tokens", [1, 7, 8])
@pytest.mark.parametrize("blocks,active_in", [(1, 5), (3, 64), (24, 576)])
@pytest.mark.parametrize("scheduled", [False, *BUDGETS])
def test_prefix_matmul_reads_only_the_prefix(tokens, blocks, active_in, scheduled):
    """Rows past the active inputs and columns past the active outputs hold NaN: any read of them would show."""
    rng = np.random.default_rng(blocks)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb, k_in = tirx.Var("nb", "int64"), tirx.Var("k", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    w = te.placeholder((I64(24), I64(576), I64(64)), "float32", name="w")  # gate_proj (1536, 576) in strips
    y = prefix.prefix_matmul(x, w, nb * 64, name="gate_proj")
    fn = compile_te([x, w, y, nb], scheduled)
    full = np.full((1536, 576), np.nan, "float32")  # (out, in) as in the checkpoint
    full[: blocks * 64, :active_in] = rng.standard_normal((blocks * 64, active_in))
    packed = np.ascontiguousarray(kernel_layout("mlp.gate_proj.weight", full))
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    out = poisoned((tokens, blocks * 64))
    fn(tvm.runtime.tensor(xs), tvm.runtime.tensor(packed), out, blocks)
    np.testing.assert_allclose(out.numpy(), xs @ full[: blocks * 64, :active_in].T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("rank,active_in,rows", [(8, 576, 576), (8, 37, 13), (3, 1, 1), (8, 100, 192), (0, 37, 13)])
def test_lora_on_prefix_matches_numpy(tokens, rank, active_in, rows):
    """The adapter as a kernel of its own (GPU targets; CPU kernels fuse it, tests/test_quant.py), the rank a
    runtime extent (0: no adapter). Adapter entries outside the active prefix are NaN: reading any of them would
    show."""
    rng = np.random.default_rng(rank + rows)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    k_in, m = tirx.Var("k", "int64"), tirx.Var("m", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    y = te.placeholder((T, m), "float32", name="y")
    r = tirx.Var("r", "int64")
    a = te.placeholder((r, I64(576)), "float32", name="a")
    bt = te.placeholder((I64(9), r, I64(64)), "float32", name="bt")  # B^T strips (kernel_layout)
    out = prefix.lora_prefix(x, y, a, bt)
    fn = compile_te([x, y, a, bt, out], scheduled=False)
    a_full, b_full = np.full((rank, 576), np.nan, "float32"), np.full((576, rank), np.nan, "float32")
    a_full[:, :active_in] = rng.standard_normal((rank, active_in))
    b_full[:rows] = rng.standard_normal((rows, rank))
    bt_full = np.ascontiguousarray(kernel_layout("mlp.up_proj.lora_B", b_full))
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    ys = rng.standard_normal((tokens, rows)).astype("float32")
    res = poisoned((tokens, rows))
    fn(*(tvm.runtime.tensor(v) for v in (xs, ys, a_full, bt_full)), res)
    expected = ys + xs @ a_full[:, :active_in].T @ b_full[:rows].T
    np.testing.assert_allclose(res.numpy(), expected, rtol=1e-4, atol=1e-4)


# tokens, past, heads, group, head dim
ATTENTION_CASES = [
    (7, 0, 5, None, 8),
    (1, 9, 6, None, 8),
    (4, 3, 6, 3, 8),
    (70, 0, 2, None, 8),
    (1, 70, 5, None, 64),
    (1, 0, 3, 3, 8),
]


@pytest.mark.parametrize(
    "tokens,past,heads,group,hd,static_token",
    [(*case, False) for case in ATTENTION_CASES] + [(*case, True) for case in ATTENTION_CASES if case[0] == 1],
)
@pytest.mark.parametrize("budget", BUDGETS)
def test_attention_matches_numpy(tokens, past, heads, group, hd, static_token, budget):
    """GQA attention over a cache; cache entries beyond past+T are garbage (large but finite) and must not matter.
    One token with a static extent is decode's kernel."""
    rng = np.random.default_rng(tokens + past)
    n_kv, rows = 2, 128
    T, p = I64(1) if static_token else tirx.Var("T", "int64"), tirx.Var("past", "int64")
    q = te.placeholder((T, I64(heads * hd)), "float32", name="q")
    kt = te.placeholder((I64(n_kv * hd), I64(rows)), "float32", name="kt")
    v = te.placeholder((I64(rows), I64(n_kv * hd)), "float32", name="v")
    out = prefix.attention(q, kt, v, p, hd, n_kv, group)
    fn = compile_te([q, kt, v, out, p], scheduled=budget)
    S = past + tokens
    qs = rng.standard_normal((tokens, heads * hd)).astype("float32")
    k_all = np.full((rows, n_kv * hd), 1e30, "float32")
    v_all = np.full((rows, n_kv * hd), 1e30, "float32")
    k_all[:S], v_all[:S] = rng.standard_normal((S, n_kv * hd)), rng.standard_normal((S, n_kv * hd))
    res = poisoned((tokens, heads * hd))
    fn(tvm.runtime.tensor(qs), tvm.runtime.tensor(np.ascontiguousarray(k_all.T)), tvm.runtime.tensor(v_all), res, past)
    expected = numpy_attention(qs, k_all, v_all, past, heads, hd, n_kv, group)
    np.testing.assert_allclose(res.numpy(), expected, rtol=1e-4, atol=1e-5)


def numpy_rope(x: np.ndarray, past: int, theta: float, hd: int) -> np.ndarray:
    """Rotate-half rotary embedding of (T, H*hd) at positions past .. past+T-1 (transformers' convention)."""
    T = x.shape[0]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(past, past + T), inv_freq)  # (T, hd/2)
    cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)  # (T, hd)
    h = x.reshape(T, -1, hd)
    rotated = np.concatenate([-h[..., hd // 2 :], h[..., : hd // 2]], axis=-1)
    return (h * cos[:, None] + rotated * sin[:, None]).reshape(x.shape)


@pytest.mark.parametrize("tokens,past", [(1, 0), (1, 300), (7, 5)])
@pytest.mark.parametrize("hd,blocks,active_in", [(64, 3, 160), (64, 9, 576), (16, 2, 48)])
@pytest.mark.parametrize("scheduled", [False, *BUDGETS])
def test_rotation_fused_into_the_projection_matches_numpy(tokens, past, hd, blocks, active_in, scheduled):
    """q = rope(x W^T + b) in the projection's kernel, from the forward's cos/sin table: pairs of one head lie in
    one strip (also with several heads per strip, hd 16); weights and bias past the active prefix are NaN."""
    rng = np.random.default_rng(tokens + blocks)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb, k_in, p = tirx.Var("nb", "int64"), tirx.Var("k", "int64"), tirx.Var("past", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    w = te.placeholder((I64(9), I64(576), I64(64)), "float32", name="w")  # q_proj (576, 576) in strips
    bias = te.placeholder((I64(576),), "float32", name="bias")
    cos_sin = prefix.rope_table(x, p, 10000.0, hd)  # a kernel of its own, as in the model: once per forward
    table = te.placeholder((T, I64(hd)), "float32", name="table")
    y = prefix.prefix_matmul(x, w, nb * 64, bias, "q_proj", rope=(table, hd))
    fn, angles = compile_te([x, w, bias, table, y, nb], scheduled), compile_te([x, cos_sin, p], False)
    full = np.full((576, 576), np.nan, "float32")
    full[: blocks * 64, :active_in] = rng.standard_normal((blocks * 64, active_in))
    b = np.full(576, np.nan, "float32")
    b[: blocks * 64] = rng.standard_normal(blocks * 64)
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    out = poisoned((tokens, blocks * 64))
    packed = np.ascontiguousarray(kernel_layout("self_attn.q_proj.weight", full))
    cs = poisoned((tokens, hd))
    angles(tvm.runtime.tensor(xs), cs, past)
    fn(*(tvm.runtime.tensor(v) for v in (xs, packed, b)), cs, out, blocks)
    expected = numpy_rope(xs @ full[: blocks * 64, :active_in].T + b[: blocks * 64], past, 10000.0, hd)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=3e-4)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit-asym-f16"])
@pytest.mark.parametrize("tokens,past", [(1, 0), (1, 300), (7, 5)])
# 3 strips of one head; 1 strip of two heads; no whole strip
@pytest.mark.parametrize("rows,hd,active_in", [(192, 64, 576), (64, 32, 64), (48, 16, 64)])
@pytest.mark.parametrize("budget", BUDGETS)
def test_norm_k_and_v_in_one_kernel_match_numpy(quantized, tokens, past, rows, hd, active_in, budget):
    """k = rope(norm(x) Wk^T + x Ak^T Bk^T), v = norm(x) Wv^T + ... as one kernel with two outputs
    (compile/export.py `_attention_inputs`: the norm in its prologue, one token's k and v tiles in one parallel
    loop), fp32 or 4-bit weights, rank-3 adapters, against numpy; everything past the active inputs is NaN or
    garbage."""
    from conftest import POISON

    from elastilm.compile.quantize import dequantize, quantize
    from elastilm.formats.quant import Format

    rng = np.random.default_rng(tokens + rows)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    p = tirx.Var("past", "int64")
    x = te.placeholder((T, I64(active_in)), "float32", name="x")  # the norm's input: the whole hidden state
    norm_w = te.placeholder((I64(active_in),), "float32", name="norm_w")
    table = te.placeholder((T, I64(hd)), "float32", name="table")
    strip = prefix.strip_width(rows)
    fmt = Format(4, asymmetric=True, half=True) if quantized else None
    h = prefix.rms_norm(x, norm_w, 1e-5)
    placeholders, arrays, expected = [], [], []
    for name in ("v_proj", "k_proj"):  # v first, as the model computes them
        w = np.full((rows, 576), np.nan, "float32")
        w[:, :active_in] = rng.standard_normal((rows, active_in))
        a_full = np.full((3, 576), np.nan, "float32")
        a_full[:, :active_in] = rng.standard_normal((3, active_in))
        b_full = rng.standard_normal((rows, 3)).astype("float32")
        a = te.placeholder((I64(3), I64(576)), "float32", name=name + "_a")
        bt = te.placeholder((I64(rows // strip), I64(3), I64(strip)), "float32", name=name + "_bt")
        rope = (table, hd) if name == "k_proj" else None
        if quantized:
            w[:, active_in:] = rng.standard_normal((rows, 576 - active_in))
            packed = quantize(w, fmt)
            deq = dequantize(packed, fmt)[:, :active_in]
            for arr, cut in zip(packed, (active_in // fmt.per_word, active_in // fmt.group, active_in // fmt.group)):
                arr[:, cut:, :] = POISON[arr.dtype]
            ps = [
                te.placeholder(tuple(I64(d) for d in v.shape), str(v.dtype), name=name + n)
                for v, n in zip(packed, "qsm")
            ]
            y = prefix.prefix_matmul_q(h, ps[0], ps[1], fmt, None, None, name, (a, bt), ps[2], rope=rope)
        else:
            packed = (np.ascontiguousarray(kernel_layout("self_attn.k_proj.weight", w)),)
            deq = w[:, :active_in]
            ps = [te.placeholder(tuple(I64(d) for d in packed[0].shape), "float32", name=name + "_w")]
            y = prefix.prefix_matmul(h, ps[0], None, None, name, (a, bt), rope=rope)
        bt_full = np.ascontiguousarray(kernel_layout("self_attn.k_proj.lora_B", b_full))
        placeholders += [*ps, a, bt]
        arrays += [*packed, a_full, bt_full]
        expected.append((deq, a_full[:, :active_in], b_full, y))
    v, k = expected[0][3], expected[1][3]
    fn = compile_te([x, norm_w, *placeholders, table, v, k], budget)
    angles = compile_te([x, prefix.rope_table(x, p, 10000.0, hd), p], False)
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    ws = rng.uniform(0.5, 1.5, active_in).astype("float32")
    cs = poisoned((tokens, hd))
    angles(tvm.runtime.tensor(xs), cs, past)
    outs = [poisoned((tokens, rows)), poisoned((tokens, rows))]  # v, k
    fn(*(tvm.runtime.tensor(a) for a in (xs, ws, *arrays)), cs, *outs)
    hs = xs / np.sqrt((xs.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * ws
    (vw, va, vb, _), (kw, ka, kb, _) = expected
    np.testing.assert_allclose(outs[0].numpy(), hs @ vw.T + hs @ va.T @ vb.T, rtol=1e-4, atol=3e-4)
    expected_k = numpy_rope(hs @ kw.T + hs @ ka.T @ kb.T, past, 10000.0, hd)
    np.testing.assert_allclose(outs[1].numpy(), expected_k, rtol=1e-4, atol=3e-4)


@pytest.mark.parametrize("tokens,static_token", [(1, True), (1, False), (7, False)])
@pytest.mark.parametrize("d", [576, 40])
def test_rms_norm_matches_numpy(tokens, static_token, d):
    """RMSNorm over the last axis, scheduled, with decode's static one-token extent and with a prompt's; d 40 is not
    a whole number of vector lanes."""
    rng = np.random.default_rng(tokens + d)
    T = I64(1) if static_token else tirx.Var("T", "int64")
    x = te.placeholder((T, I64(d)), "float32", name="x")
    w = te.placeholder((I64(d),), "float32", name="w")
    fn = compile_te([x, w, prefix.rms_norm(x, w, 1e-5)], scheduled=True)
    xs, ws = 3 * rng.standard_normal((tokens, d)).astype("float32"), rng.standard_normal(d).astype("float32")
    out = poisoned((tokens, d))
    fn(tvm.runtime.tensor(xs), tvm.runtime.tensor(ws), out)
    expected = xs / np.sqrt((xs.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * ws
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,static_token", [(1, True), (7, False)])
@pytest.mark.parametrize("width", [1536, 64 * 3, 40])
def test_silu_mul_matches_numpy(tokens, static_token, width):
    """silu(gate) * up with the polynomial exp, scheduled, against float64 numpy, over gates far into both tails
    (|gate| up to 100, where exp(-gate) under- or overflows fp32); width 40 is not a whole number of lanes."""
    rng = np.random.default_rng(tokens + width)
    T = I64(1) if static_token else tirx.Var("T", "int64")
    gate = te.placeholder((T, I64(width)), "float32", name="gate")
    up = te.placeholder((T, I64(width)), "float32", name="up")
    fn = compile_te([gate, up, prefix.silu_mul(gate, up)], scheduled=True)
    gs = (rng.standard_normal((tokens, width)) * 4).astype("float32")
    gs.flat[: 2 * 4] = [-100, -88.5, -60, -20, 20, 60, 88.5, 100]
    us = rng.standard_normal((tokens, width)).astype("float32")
    out = poisoned((tokens, width))
    fn(tvm.runtime.tensor(gs), tvm.runtime.tensor(us), out)
    g = gs.astype(np.float64)
    np.testing.assert_allclose(out.numpy(), g / (1 + np.exp(-g)) * us, rtol=2e-6, atol=1e-6)
