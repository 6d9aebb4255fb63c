"""Group-quantized weights: the packing against a hand computation, the round trip within half a step, and the
fused dequantizing prefix matmul against numpy on the dequantized weights at several (odd) widths, reading only
the active prefix (words outside it are garbage, scales NaN)."""

import numpy as np
import pytest
import tvm
from conftest import POISON
from test_elastic_ops import BUDGETS, I64, compile_te, poisoned
from tvm import te, tirx

from elastilm.compile.export import kernel_layout
from elastilm.compile.quantize import dequantize, quantize, simulated_adapters
from elastilm.elastic_ops import prefix
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.quant import SCHEMES, Format, scheme

QUANTIZED = [s for s in SCHEMES.values() if s.quantized]
FORMATS = [
    Format(4),
    Format(8),
    Format(4, asymmetric=True),
    Format(4, asymmetric=True, half=True),
    Format(8, half=True),
]


def fmt_id(f: Format) -> str:
    return f"{f.bits}bit-{'asym' if f.asymmetric else 'sym'}{'-f16' if f.half else ''}"


def test_four_bit_packing_by_hand():
    """One output row, 32 inputs: scale max|w| / 7 = 1.0; stored w + 7, eight per word, lowest bits first."""
    fmt = scheme("q4f32_1").linear
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = [-7, -3, 0, 1, 2, 3, 7, 5]
    q, scale = quantize(w, fmt)
    assert q.shape == (1, 4, 1) and scale.shape == (1, 1, 1) and scale[0, 0, 0] == 1.0
    expected = sum((v + 7) << (4 * n) for n, v in enumerate([-7, -3, 0, 1, 2, 3, 7, 5]))
    assert int(q[0, 0, 0]) == expected and int(q[0, 1, 0]) == sum(7 << (4 * n) for n in range(8))
    np.testing.assert_array_equal(dequantize((q, scale), fmt), w)


@pytest.mark.parametrize("half", [False, True])
def test_asymmetric_four_bit_packing_by_hand(half):
    """One row, 32 inputs from -2 to 13: step (13 - -2) / 15 = 1, minimum -2; stored w + 2 in 0..15; the scale
    and minimum as fp32, or as fp16 bits (0x3C00 = 1.0, 0xC000 = -2.0)."""
    fmt = Format(4, asymmetric=True, half=half)
    values = np.array([-2, 13, 0, 5, -1, 7, 3, 12] * 4, np.float32)
    q, scale, minimum = quantize(values[None, :], fmt)
    if half:
        assert scale.dtype == np.uint16 and int(scale[0, 0, 0]) == 0x3C00 and int(minimum[0, 0, 0]) == 0xC000
    else:
        assert scale[0, 0, 0] == 1.0 and minimum[0, 0, 0] == -2.0
    assert int(q[0, 0, 0]) == sum(int(v + 2) << (4 * n) for n, v in enumerate(values[:8]))
    np.testing.assert_array_equal(dequantize((q, scale, minimum), fmt)[0], values)


def test_the_mixed_scheme_keeps_down_proj_and_the_embedding_at_eight_bits():
    s = scheme("q4f32_mix")
    assert s.format("model.layers.2.self_attn.o_proj") == Format(4, asymmetric=True, half=True)
    assert s.format("model.layers.2.mlp.up_proj.weight") == Format(4, asymmetric=True, half=True)
    assert s.format("model.layers.2.mlp.down_proj.weight") == Format(8, half=True)
    assert s.format("model.embed_tokens.weight") == s.format("lm_head") == Format(8, half=True)
    assert scheme("q0f32").format("model.embed_tokens") is None
    assert scheme("q4f32_1").format("model.layers.0.mlp.down_proj") == Format(4)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("rows,cols", [(128, 64), (40, 96), (1536, 576)])
def test_round_trip_is_within_half_a_step(fmt, rows, cols):
    rng = np.random.default_rng(rows)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    w[:, : fmt.group] += rng.uniform(-4, 4, (rows, 1)).astype(np.float32)  # groups off centre
    w[0, : fmt.group] = 0  # an all-zero group stays zero
    w[1, : fmt.group] = 0.25  # so does a constant one
    packed = quantize(w, fmt)
    deq = dequantize(packed, fmt)
    scales = packed[1].view(np.float16).astype(np.float32) if fmt.half else packed[1]
    step = np.repeat(scales.swapaxes(1, 2).reshape(rows, -1), fmt.group, axis=1)
    assert np.all(np.abs(deq - w) <= step / 2 * (1 + 1e-3) + 1e-6)
    assert np.all(deq[0, : fmt.group] == 0)
    grouped, back = w.reshape(rows, -1, fmt.group), deq.reshape(rows, -1, fmt.group)
    if fmt.half:  # fp16 scales and minima: the half step is the bound (above), the extremes are not exact
        assert not fmt.asymmetric or np.all(deq[1, : fmt.group] == np.float32(0.25))  # its minimum, exact in fp16
    elif fmt.asymmetric:  # the smallest and the largest weight of each group are exact
        np.testing.assert_allclose(back.min(-1), grouped.min(-1), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(back.max(-1), grouped.max(-1), rtol=1e-6, atol=1e-6)
        assert np.all(deq[1, : fmt.group] == np.float32(0.25))
    else:  # the largest magnitude of each group is exact
        np.testing.assert_allclose(np.abs(back).max(-1), np.abs(grouped).max(-1), rtol=1e-6)


@pytest.mark.parametrize("native", [False, True], ids=["integer", "native"])
def test_fp16_scales_are_widened_exactly_by_the_kernels(native):
    """Every finite fp16 bit pattern (normal, subnormal, both zeros) read by `prefix.as_f32` equals numpy's
    float16 -> float32, widened with integer operations (no fp16 type in the kernel) or by the CPU's conversion."""
    n = I64(1 << 16)
    bits = te.placeholder((n,), "uint16", name="bits")
    with prefix.native_half(native):
        out = te.compute((n,), lambda i: prefix.as_f32(bits[i]), name="widened")
    fn = compile_te([bits, out], scheduled=False)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = poisoned((1 << 16,))
    fn(tvm.runtime.tensor(every), got)
    want = every.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    assert finite.sum() == 63488
    np.testing.assert_array_equal(got.numpy()[finite].view(np.uint32), want[finite].view(np.uint32))


def test_fp16_scales_are_rounded_before_the_levels_are_chosen():
    """A `half` format stores fp16 scales and minima and picks each level with the rounded ones: the round trip
    stays within half a (rounded) step, and weights that are exact in fp16 blocks (llama.cpp's Q4_1: fp16 scale
    d and minimum m, w = q d + m) come back exactly."""
    rng = np.random.default_rng(5)
    fmt = Format(4, asymmetric=True, half=True)
    d = rng.uniform(0.001, 0.05, (64, 4, 1)).astype(np.float16).astype(np.float64)
    m = rng.uniform(-0.5, 0.0, (64, 4, 1)).astype(np.float16).astype(np.float64)
    levels = rng.integers(0, 16, (64, 4, 32))
    levels[..., 0], levels[..., 1] = 0, 15  # each block spans its whole range, as llama.cpp's quantizer makes it
    w = (levels * d + m).reshape(64, 128).astype(np.float32)
    q, scale, minimum = quantize(w, fmt)
    assert scale.dtype == minimum.dtype == np.uint16
    np.testing.assert_array_equal(dequantize((q, scale, minimum), fmt), w)
    noisy = w + rng.normal(0, 0.01, w.shape).astype(np.float32)
    packed = quantize(noisy, fmt)
    step = np.repeat(packed[1].view(np.float16).astype(np.float32).swapaxes(1, 2).reshape(64, -1), 32, axis=1)
    assert np.all(np.abs(dequantize(packed, fmt) - noisy) <= step / 2 * (1 + 1e-3) + 1e-6)


def test_asymmetric_groups_are_closer_on_groups_off_centre():
    """A group whose weights lie in [1, 2]: symmetric levels span [-2, 2] and use half of them; asymmetric ones span
    [1, 2]. The asymmetric error is at most a third of the symmetric one here."""
    rng = np.random.default_rng(0)
    w = rng.uniform(1, 2, (64, 64)).astype(np.float32)
    sym, asym = Format(4), Format(4, asymmetric=True)
    err_sym = np.abs(dequantize(quantize(w, sym), sym) - w).max()
    err_asym = np.abs(dequantize(quantize(w, asym), asym) - w).max()
    assert err_asym < err_sym / 3


def test_widths_must_be_whole_groups():
    valid = "valid schemes are q0f32, q4f32_1, q8f32_1, q4f32_mix"
    with pytest.raises(ElastiLMError, match=f"unknown quantization 'q4'; {valid}"):
        scheme("q4")
    with pytest.raises(ElastiLMError, match="neurons is 40, not a whole number of q4f32_1's groups of 32; use 64"):
        scheme("q4f32_1").check_width(40, "neurons", "use 64")
    scheme("q4f32_1").check_width(64, "neurons", "")
    scheme("q0f32").check_width(40, "neurons", "")


def poisoned_prefix(packed: tuple, fmt: Format, blocks: int, active_in: int) -> tuple[tuple, np.ndarray]:
    """The packed arrays with garbage words and NaN scales / minima outside the active prefix (in place), and the
    active prefix dequantized (blocks*64, active_in)."""
    words, groups = active_in // fmt.per_word, active_in // fmt.group
    for a, cut in zip(packed, (words, groups, groups)):
        bad = POISON.get(a.dtype, np.nan)
        a[:, cut:, :] = bad  # past the active inputs
        a[blocks:] = bad  # past the active outputs
    deq = dequantize(tuple(a[:blocks, :cut] for a, cut in zip(packed, (words, groups, groups))), fmt)
    return packed, deq


def placeholders(packed: tuple) -> list:
    return [
        te.placeholder(tuple(I64(d) for d in a.shape), str(a.dtype), name=n) for a, n in zip(packed, ("q", "s", "m"))
    ]


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("blocks,active_in", [(1, 32), (3, 160), (24, 576)])
@pytest.mark.parametrize("scheduled", [False, *BUDGETS])
def test_quantized_prefix_matmul_reads_only_the_prefix(fmt, tokens, blocks, active_in, scheduled):
    rng = np.random.default_rng(blocks + tokens)
    w = (rng.standard_normal((1536, 576)) + rng.uniform(-1, 1, (1536, 1))).astype(np.float32)
    packed, deq = poisoned_prefix(quantize(w, fmt), fmt, blocks, active_in)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb, k_in = tirx.Var("nb", "int64"), tirx.Var("k", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    ps = placeholders(packed)
    y = prefix.prefix_matmul_q(x, ps[0], ps[1], fmt, nb * 64, name="gate_proj", minimum=ps[2] if len(ps) > 2 else None)
    fn = compile_te([x, *ps, y, nb], scheduled)
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    out = poisoned((tokens, blocks * 64))
    fn(tvm.runtime.tensor(xs), *(tvm.runtime.tensor(a) for a in packed), out, blocks)
    np.testing.assert_allclose(out.numpy(), xs @ deq.T, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize(
    "fmt,half",
    [(None, False), (Format(4, asymmetric=True), False), (Format(4, asymmetric=True, half=True), True)],
    ids=["fp32", "4bit-asym", "4bit-asym-f16-adapters"],
)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("rank", [0, 3, 8])
@pytest.mark.parametrize("blocks,active_in", [(1, 32), (3, 160), (24, 576)])
@pytest.mark.parametrize("scheduled", [False, *BUDGETS])
def test_adapter_fused_into_the_prefix_matmul_matches_numpy(fmt, half, tokens, rank, blocks, active_in, scheduled):
    """y = x W^T + b + x A^T Bt + residual in one kernel, the rank a runtime extent (0: no adapter, no work); the
    adapter in fp32 or as fp16 bits (q4f32_mix). Weights, scales, adapter entries and the bias outside the active
    prefix are NaN or garbage: reading any of them would show."""
    rng = np.random.default_rng(blocks + tokens + rank)
    w = rng.standard_normal((1536, 576)).astype(np.float32)
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb, k_in, r = tirx.Var("nb", "int64"), tirx.Var("k", "int64"), tirx.Var("r", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    stored = "uint16" if half else "float32"
    a = te.placeholder((r, I64(576)), stored, name="a")
    bt = te.placeholder((I64(24), r, I64(64)), stored, name="bt")  # B^T strips (kernel_layout)
    bias = te.placeholder((I64(1536),), "float32", name="bias")
    res = te.placeholder((T, nb * 64), "float32", name="residual")
    if fmt is not None:
        packed, deq = poisoned_prefix(quantize(w, fmt), fmt, blocks, active_in)
        weights = placeholders(packed)
        y = prefix.prefix_matmul_q(x, *weights[:2], fmt, nb * 64, bias, "gate_proj", (a, bt), weights[2], res)
        tensors = list(packed)
    else:
        packed = np.ascontiguousarray(kernel_layout("mlp.gate_proj.weight", w))  # (24, 576, 64)
        packed[:, active_in:, :], packed[blocks:] = np.nan, np.nan
        deq = w[: blocks * 64, :active_in]
        wp = te.placeholder(tuple(I64(d) for d in packed.shape), "float32", name="w")
        y = prefix.prefix_matmul(x, wp, nb * 64, bias, "gate_proj", (a, bt), res)
        weights, tensors = [wp], [packed]
    fn = compile_te([x, *weights, a, bt, bias, res, y, nb], scheduled)
    a_full, b_full = np.full((rank, 576), np.nan, "float32"), np.full((1536, rank), np.nan, "float32")
    a_full[:, :active_in] = rng.standard_normal((rank, active_in))
    b_full[: blocks * 64] = rng.standard_normal((blocks * 64, rank))
    b_vec = np.full(1536, np.nan, "float32")
    b_vec[: blocks * 64] = rng.standard_normal(blocks * 64)
    xs = rng.standard_normal((tokens, active_in)).astype("float32")
    skip = rng.standard_normal((tokens, blocks * 64)).astype("float32")
    out = poisoned((tokens, blocks * 64))
    bt_full = np.ascontiguousarray(kernel_layout("mlp.gate_proj.lora_B", b_full))
    if half:  # what the kernel computes with: the adapter rounded to fp16 (NaN stays NaN)
        a_full, b_full = a_full.astype(np.float16).astype(np.float32), b_full.astype(np.float16).astype(np.float32)
        a_in, bt_in = (v.astype(np.float16).view(np.uint16) for v in (a_full, bt_full))
    else:
        a_in, bt_in = a_full, bt_full
    fn(*(tvm.runtime.tensor(v) for v in (xs, *tensors, a_in, bt_in, b_vec, skip)), out, blocks)
    expected = xs @ deq.T + b_vec[: blocks * 64] + xs @ a_full[:, :active_in].T @ b_full[: blocks * 64].T + skip
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=2e-4)


def _poisoned_projection(rng, fmt: Format | None, rows: int, strip: int, active_rows: int, active_in: int):
    """A (rows, 576) weight in the kernels' layout with everything outside the active prefix poisoned: (the
    packed arrays, the active prefix dequantized (active_rows, active_in))."""
    w = (rng.standard_normal((rows, 576)) + rng.uniform(-1, 1, (rows, 1))).astype(np.float32)
    out_rows = np.arange(active_rows, rows)
    if fmt is None:
        packed = np.ascontiguousarray(kernel_layout("mlp.gate_proj.weight", w))  # (rows / strip, 576, strip)
        packed[:, active_in:, :] = np.nan
        packed[out_rows // strip, :, out_rows % strip] = np.nan
        return (packed,), w[:active_rows, :active_in]
    packed = quantize(w, fmt)
    assert packed[0].shape[2] == strip
    deq_all = dequantize(packed, fmt)
    words, groups = active_in // fmt.per_word, active_in // fmt.group
    for a, cut in zip(packed, (words, groups, groups)):
        bad = POISON.get(a.dtype, np.nan)
        a[:, cut:, :] = bad
        a[out_rows // strip, :, out_rows % strip] = bad
    return packed, deq_all[:active_rows, :active_in]


@pytest.mark.parametrize(
    "fmt", [None, Format(8), Format(4, asymmetric=True, half=True)], ids=["fp32", "8bit-sym", "4bit-asym-f16"]
)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize(
    "rows,unit,blocks,active_in", [(1536, 64, 1, 32), (1536, 64, 3, 160), (1536, 64, 24, 576), (40, 8, 3, 96)]
)
@pytest.mark.parametrize("budget", BUDGETS)
def test_gated_mlp_in_one_kernel_matches_numpy(fmt, tokens, rank, rows, unit, blocks, active_in, budget):
    """silu(x Wg^T + x Ag^T Bg^T) * (x Wu^T + x Au^T Bu^T) as one scheduled kernel (both matmuls' tiles in one
    parallel loop, compile/export.py `_gated`) against numpy, at active widths of 1, 3 and 24 strips and at a width
    that is no whole strip (rows 40, 24 active: the fallback schedule); weights, scales and adapter entries outside
    the active prefix are NaN or garbage."""
    rng = np.random.default_rng(blocks + tokens + rank + rows)
    strip = prefix.strip_width(rows)
    active = blocks * unit
    T = I64(1) if tokens == 1 else tirx.Var("T", "int64")
    nb, k_in, r = tirx.Var("nb", "int64"), tirx.Var("k", "int64"), tirx.Var("r", "int64")
    x = te.placeholder((T, k_in), "float32", name="x")
    args, arrays, expected_parts = [], [], []
    matmuls = []
    for which in ("gate", "up"):
        packed, deq = _poisoned_projection(rng, fmt, rows, strip, active, active_in)
        ps = (
            placeholders(packed)
            if fmt is not None
            else [te.placeholder(tuple(I64(d) for d in packed[0].shape), "float32", name="w")]
        )
        a = te.placeholder((r, I64(576)), "float32", name=f"a_{which}")
        bt = te.placeholder((I64(rows // strip), r, I64(strip)), "float32", name=f"bt_{which}")
        name = f"{which}_proj"
        if fmt is not None:
            y = prefix.prefix_matmul_q(
                x, ps[0], ps[1], fmt, nb * unit, None, name, (a, bt), ps[2] if len(ps) > 2 else None
            )
        else:
            y = prefix.prefix_matmul(x, ps[0], nb * unit, None, name, (a, bt))
        matmuls.append(y)
        a_full, b_full = np.full((rank, 576), np.nan, "float32"), np.full((rows, rank), np.nan, "float32")
        a_full[:, :active_in] = rng.standard_normal((rank, active_in))
        b_full[:active] = rng.standard_normal((active, rank))
        bt_full = np.ascontiguousarray(b_full.reshape(rows // strip, strip, rank).transpose(0, 2, 1))
        args += [*ps, a, bt]
        arrays += [*packed, a_full, bt_full]
        expected_parts.append((deq, a_full[:, :active_in], b_full[:active]))
    act = prefix.silu_mul(*matmuls)
    fn = compile_te([x, *args, act, nb], budget)
    xs = (rng.standard_normal((tokens, active_in)) / np.sqrt(active_in)).astype("float32")  # gates of a few units
    out = poisoned((tokens, active))
    fn(tvm.runtime.tensor(xs), *(tvm.runtime.tensor(v) for v in arrays), out, blocks)
    (gw, ga, gb), (uw, ua, ub) = expected_parts
    g = (xs @ gw.T + xs @ ga.T @ gb.T).astype(np.float64)
    u = xs @ uw.T + xs @ ua.T @ ub.T
    np.testing.assert_allclose(out.numpy(), g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("vocab", [192, 97])  # three strips of 64; one strip of the whole (odd) vocabulary
@pytest.mark.parametrize("scheduled", [False, True])
def test_quantized_embedding_unpacks_only_the_looked_up_rows(fmt, vocab, scheduled):
    rng = np.random.default_rng(vocab)
    table = (rng.standard_normal((vocab, 96)) + rng.uniform(-1, 1, (vocab, 1))).astype(np.float32)
    packed = quantize(table, fmt)
    ids = np.array([5, 0, vocab - 1, 5, 64 % vocab], "int32")
    strip = packed[0].shape[2]
    poison = np.ones((packed[0].shape[0] * strip,), bool)
    poison[ids] = False
    rows = np.arange(poison.size)[poison]  # every row that is not looked up: NaN scales, garbage words
    for a in packed:
        a[rows // strip, :, rows % strip] = POISON.get(a.dtype, np.nan)
    n = tirx.Var("n", "int64")
    ip = te.placeholder((n,), "int32", name="ids")
    ps = placeholders(packed)
    out = prefix.embed_q(ip, ps[0], ps[1], fmt, ps[2] if len(ps) > 2 else None)
    fn = compile_te([ip, *ps, out], scheduled)
    got = poisoned((len(ids), 96))
    fn(tvm.runtime.tensor(ids), *(tvm.runtime.tensor(a) for a in packed), got)
    expected = dequantize(quantize(table, fmt), fmt)[ids]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    assert np.abs(expected - table[ids]).max() > 1e-4  # the quantization shows


@pytest.fixture(scope="module", params=[s.name for s in QUANTIZED])
def quantized_build(request, tmp_path_factory):
    """The grouped tiny model with large random adapters, compiled with quantized weights; (model, adapters, the
    reference's parameters: the same packed weights dequantized, build folder, scheme)."""
    import torch
    from conftest import elastified_tiny, random_adapters

    from elastilm.compile.build import build
    from elastilm.formats import adapters as adapters_file
    from elastilm.formats import elastic
    from elastilm.formats.config import projection_names

    s = scheme(request.param)
    folder = elastified_tiny(tmp_path_factory, "llama-grouped", neuron_multiple=32)
    model = elastic.load(folder, with_tokenizer=False)
    adapters = random_adapters(model, 4, seed=3)
    adapters_file.save(folder, adapters, {"note": "random adapters for tests"})
    params = dict(model.params)
    tables = ["model.embed_tokens"] + ([] if model.config.tie_word_embeddings else ["lm_head"])
    for name in projection_names(model.config) + tables:  # by hand: compile.quantize.simulated is tested on this
        fmt = s.format(name)
        params[name + ".weight"] = torch.from_numpy(dequantize(quantize(params[name + ".weight"].numpy(), fmt), fmt))
    return (
        model,
        adapters,
        params,
        build(folder, "host-cpu", tmp_path_factory.mktemp("q") / "build", 40, quantization=s.name),
        s,
    )


def test_quantized_build_matches_the_dequantized_reference_at_every_level(quantized_build):
    """Prefill and decode at every level, with each level's adapter and without, against the torch reference on the
    dequantized weights (max |logit diff| <= 1e-3); the fp32 weights give other logits (the test sees the scheme)."""
    import torch
    from conftest import random_ids

    from elastilm.compile import reference
    from elastilm.formats import build as build_file
    from elastilm.runtime_py.engine import ElasticEngine

    model, adapters, params, out, s = quantized_build
    manifest = build_file.read_manifest(out)
    assert manifest["quantization"] == s.describe()
    assert manifest["quantization"]["down_proj"]["bits"] == (8 if s.name in ("q8f32_1", "q4f32_mix") else 4)
    assert any(n.endswith(".q_weight") for n in manifest["param_names"])
    assert any(n.endswith(".q_min") for n in manifest["param_names"]) == (s.name == "q4f32_mix")
    assert not any(n.endswith("_proj.weight") for n in manifest["param_names"])
    ids = random_ids(model.config, batch=1, length=7, seed=2)[0].tolist()
    assert len({lv.neurons for lv in model.levels.values()}) > 2  # several widths, each whole groups
    for use in (True, False):
        engine = ElasticEngine(out, adapters=use)
        for lv in model.levels.values():
            widths = model.widths(lv.fraction)
            level_adapters = simulated_adapters(adapters.get(lv.fraction), s) if use else None
            expected = reference.logits(params, model.config, torch.tensor([ids]), widths, level_adapters)[0].numpy()
            got = engine.prefill(ids[:-1], lv.fraction)
            np.testing.assert_allclose(got, expected[-2], atol=1e-3, rtol=0)
            np.testing.assert_allclose(
                engine.decode(ids[-1], len(ids) - 1, lv.fraction), expected[-1], atol=1e-3, rtol=0
            )
        fp32 = reference.logits(model.params, model.config, torch.tensor([ids]))[0, -1].numpy()
        assert np.abs(engine.decode(ids[-1], len(ids) - 1, 1.0) - fp32).max() > 1e-3
        engine.close()


def test_a_model_whose_widths_are_not_whole_groups_is_refused(tmp_path_factory):
    from conftest import elastified_tiny

    from elastilm.compile.build import build

    folder = elastified_tiny(tmp_path_factory, "llama")  # hidden 48, head_dim 8, neuron blocks of 1
    with pytest.raises(ElastiLMError, match="the hidden size is 48, not a whole number of q4f32_1's groups of 32"):
        build(folder, "host-cpu", tmp_path_factory.mktemp("q") / "build", 40, quantization="q4f32_1")
    with pytest.raises(ElastiLMError, match="unknown quantization 'int4'"):
        build(folder, "host-cpu", tmp_path_factory.mktemp("q") / "build", 40, quantization="int4")


def test_simulated_parameters_are_the_builds_dequantized_weights(quantized_build):
    from elastilm.compile.quantize import simulated

    model, _, params, _, s = quantized_build
    got = simulated(model.params, model.config, s)
    assert got.keys() == params.keys()
    import torch

    for name, value in params.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert simulated(model.params, model.config, scheme("q0f32")) is model.params


def test_recovery_trains_against_the_quantized_base_and_the_build_checks_it(tmp_path_factory):
    """recover --quant: at the first step (B = 0, so the student is its base) the KL is that of the dequantized
    sub-model against the fp32 full model, computed here independently, and not the fp32 sub-model's; a build of
    another quantized scheme refuses those adapters, the same scheme records them."""
    import shutil

    import torch
    import torch.nn.functional as F
    from conftest import elastified_tiny

    from elastilm.compile import corpus, reference
    from elastilm.compile.build import build
    from elastilm.formats import build as build_file
    from elastilm.formats import elastic
    from elastilm.formats.config import projection_names
    from elastilm.train import recover

    folder = tmp_path_factory.mktemp("qlora") / "m"
    shutil.copytree(elastified_tiny(tmp_path_factory, "llama-grouped", neuron_multiple=32), folder)
    options = recover.RecoverOptions(
        rank=4, alpha=8.0, tokens=2 * 2 * 16, seq_len=16, batch=2, lr=1e-2, chat=0.0, quant="q4f32_1"
    )
    summary = recover.recover(folder, options, progress=False)
    model = elastic.load(folder)
    stream = corpus.token_stream(model.tokenizer, "calibration")
    batch = corpus.random_windows(stream, options.steps * options.batch, options.seq_len, options.seed + 1)[:2]
    teacher = F.log_softmax(reference.logits(model.params, model.config, batch), -1)
    mask = torch.ones(batch.shape, dtype=torch.bool)
    dequantized = {}
    for name in projection_names(model.config) + ["model.embed_tokens"]:
        w = model.params[name + ".weight"].numpy()
        dequantized[name + ".weight"] = torch.from_numpy(dequantize(quantize(w, Format(4)), Format(4)))
    for row in summary["levels"]:
        widths = model.widths(float(row["fraction"]))
        q4 = recover._kl(teacher, reference.logits({**model.params, **dequantized}, model.config, batch, widths), mask)
        fp32 = recover._kl(teacher, reference.logits(model.params, model.config, batch, widths), mask)
        assert row["kl_first"] == pytest.approx(q4.item(), abs=2e-5)
        assert abs(q4.item() - fp32.item()) > 1e-3
    with pytest.raises(ElastiLMError, match="trained against q4f32_1 weights and this build is q8f32_1"):
        build(folder, "host-cpu", tmp_path_factory.mktemp("q") / "b8", 40, quantization="q8f32_1")
    out = build(folder, "host-cpu", tmp_path_factory.mktemp("q") / "b4", 40, quantization="q4f32_1")
    assert build_file.read_manifest(out)["adapters_trained_on"] == "q4f32_1"


def test_quality_per_level_of_a_quantized_scheme(quantized_build, tmp_path, tmp_path_factory):
    """`elastilm quality --quant`: the perplexity of the weights as the build computes with them (dequantized here
    by hand, in the fixture), written beside the fp32 table under the scheme's name."""
    import shutil

    from conftest import elastified_tiny

    from elastilm.compile import corpus
    from elastilm.evaluate import quality
    from elastilm.formats import elastic

    _, _, params, _, s = quantized_build
    folder = tmp_path / "m"
    shutil.copytree(elastified_tiny(tmp_path_factory, "llama-grouped", neuron_multiple=32), folder)
    model = elastic.load(folder)
    rows = quality.evaluate(folder, windows=2, seq_len=16, progress=False, scheme=s.name)
    heldout = corpus.consecutive_windows(corpus.token_stream(model.tokenizer, "heldout"), 2, 16)
    full = next(r for r in rows if r["level"] == 1.0)
    assert full["ppl_reordered"] == pytest.approx(quality.perplexity(params, model.config, heldout, None), rel=1e-6)
    assert full["ppl_reordered"] != pytest.approx(quality.perplexity(model.params, model.config, heldout, None))
    assert all(r["ppl_original_order"] is None for r in rows)
    assert (folder / f"quality-{s.name}.md").is_file() and not (folder / "quality.md").exists()


def test_the_scheme_is_checked_by_name_in_the_engine_and_the_bundle(quantized_build, tmp_path):
    from elastilm.compile.package import package
    from elastilm.formats import bundle
    from elastilm.runtime_py.engine import ElasticEngine

    _, _, _, out, s = quantized_build
    with pytest.raises(ElastiLMError, match=f"its weights are {s.name}, expected q0f32; build it with"):
        ElasticEngine(out, quant="q0f32")
    ElasticEngine(out, quant=s.name).close()
    app = bundle.read(package([out], tmp_path / "bundle"))
    (entry,) = app["models"]
    assert entry["model_id"].endswith(f"-host-cpu-{s.name}")
    assert entry["quantization"] == s.describe()
    engine = ElasticEngine.from_bundle(tmp_path / "bundle", quant=s.name)
    assert engine.manifest["quantization"]["scheme"] == s.name
    engine.close()
