"""Tensor-expression operators over active prefixes of full-width weight buffers.

Every weight argument is the whole reordered buffer; the active extent comes either from an activation's shape
(reductions over a prefix of inputs) or from a symbolic width passed as a scalar (prefix of outputs).
No operator slices or copies a weight: the generated loops simply stop early.
Shapes use T for new tokens, S for cached + new positions, d for hidden size, hd for head dim.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

from tvm import te, tirx, topi

from elastilm.elastic_ops import blocks
from elastilm.formats.quant import Format

STRIP = 64  # output columns per packed weight strip
TOKEN_BLOCK = 4  # prefill computes whole blocks of 4 tokens (a register tile); padded rows repeat the last token


def _token_blocks(T):
    """T rounded up to TOKEN_BLOCK, except a single decode token."""
    if isinstance(T, tirx.IntImm) and T.value == 1:
        return T
    return (T + TOKEN_BLOCK - 1) // TOKEN_BLOCK * TOKEN_BLOCK


def strip_width(out_features: int) -> int:
    """Packed strip width of a linear layer: STRIP when it divides the output size, else the whole output."""
    return STRIP if out_features % STRIP == 0 else out_features


def _matmul_over(x: te.Tensor, weight, rows, bias: te.Tensor | None, name: str, lora=None, residual=None, rope=None):
    """y[t, i] = sum_{k < K_active} x[t, k] * weight(i, k) (+ bias[i]) (+ the adapter's update) (+ residual[t, i])
    for i < rows, rotated by `rope` if given (`_output`)."""
    T, K_active = x.shape
    T_blocks = _token_blocks(T)
    k = te.reduce_axis((0, K_active), "k")
    y = te.compute(  # rows t >= T (prefill padding) repeat the last token and are dropped below
        (T_blocks, rows), lambda t, i: te.sum(x[tirx.min(t, T - 1), k] * weight(i, k), axis=k), name=name
    )
    return _output(x, y, bias, name, lora, residual, rope)


def _output(x: te.Tensor, y: te.Tensor, bias: te.Tensor | None, name: str, lora, residual=None, rope=None):
    """The block "<name>_out" (T, rows): y (+ bias) (+ the update x @ A^T @ B^T of the adapter `lora` = (A (r, K),
    Bt), Bt = B^T in strips (M / strip, r, strip), read on the active prefix: LORA_A x @ A^T (T, r), LORA_B its
    product with Bt; float32, or uint16 holding fp16 bits: `as_f32`) (+ `residual` (T, rows), the decoder's
    skip connection, so that it costs no kernel of its own), the padded token rows dropped. With `rope` = (the
    forward's `rope_table` (T, hd), hd) that sum is rotated as `rope` rotates it, by the block "<name>_rotated"
    in the same kernel (it pairs outputs half a head apart, so it follows the tiles rather than joining them)."""
    T, rows = x.shape[0], y.shape[1]
    terms = [lambda t, i: y[t, i]]
    if bias is not None:
        terms.append(lambda t, i: bias[i])
    if lora is not None:
        a, bt = lora
        up = _lora_up(_lora_down(x, a, name), bt, T, y.shape, name)
        terms.append(lambda t, i: _lora_term(up, bt, t, i))
    if residual is not None:
        terms.append(lambda t, i: residual[t, i])

    def total(t, i):
        value = terms[0](t, i)
        for term in terms[1:]:
            value = value + term(t, i)
        return value

    out = te.compute((T, rows), total, name=name + "_out")
    if rope is None:
        return out
    table, head_dim = rope
    half = head_dim // 2

    def rotated(t, i):
        j = i % head_dim
        pair = i // head_dim * head_dim + (j + half) % head_dim  # the other half of the head
        sign = tirx.if_then_else(j < half, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
        return out[t, i] * table[t, j % half] + sign * out[t, pair] * table[t, half + j % half]

    return te.compute((T, rows), rotated, name=name + blocks.ROTATED)


def _lora_up(down: te.Tensor, bt: te.Tensor, T, shape, owner: str):
    """down @ B^T: (T_blocks, rows), rows t >= T (prefill padding) repeating the last token. Bt (M / strip, r,
    strip) holds each strip's r x strip block in one piece, so that a projection kernel's strip reads its share of
    the adapter in one stream (B^T as (r, M) would be r short reads M apart, each a cache miss). At rank 0 the
    reduction has no steps, and a schedule that keeps the initialisation inside the reduction loop (TIR's unless
    it is decomposed) leaves the output unwritten: read it through `_lora_term`."""
    strip = bt.shape[2]
    j = te.reduce_axis((0, bt.shape[1]), "j")
    return te.compute(
        shape,
        lambda t, i: te.sum(down[tirx.min(t, T - 1), j] * as_f32(bt[i // strip, j, i % strip]), axis=j),
        name=blocks.of(owner, blocks.LORA_B),
    )


def _lora_term(up: te.Tensor, bt: te.Tensor, t, i):
    """up[t, i], or 0 at rank 0 (then `up` was never written)."""
    return tirx.if_then_else(bt.shape[1] > 0, up[t, i], tirx.const(0.0, "float32"))


def _lora_down(x: te.Tensor, a: te.Tensor, owner: str):
    """x @ A[:, :K_active]^T: (T, r)."""
    T, K_active = x.shape
    k = te.reduce_axis((0, K_active), "k")
    return te.compute(
        (T, a.shape[0]), lambda t, j: te.sum(x[t, k] * as_f32(a[j, k]), axis=k), name=blocks.of(owner, blocks.LORA_A)
    )


def prefix_matmul(
    x: te.Tensor,
    wp: te.Tensor,
    rows=None,
    bias: te.Tensor | None = None,
    name: str = "matmul",
    lora=None,
    residual: te.Tensor | None = None,
    rope=None,
):
    """y[t, i] = sum_{k < K_active} x[t, k] * W[i, k] (+ bias[i]) (+ the update of the adapter `lora` = (A, Bt),
    as in `lora_prefix`, in the same kernel) (+ residual[t, i]) for i < rows, rotated by `rope` = (`rope_table`,
    head_dim) if given (`_output`).

    x: (T, K_active) with K_active <= K. wp: (M / strip, K, strip), the weight W (M, K) packed in strips of
    `strip` output columns, each stored input-major. Both prefixes stay contiguous: the active outputs are the
    first strips, the active inputs the first rows of each strip, and a kernel streams one strip at a time.
    Returns (T, rows), rows defaulting to M.
    """
    n_strips, _, strip = wp.shape
    rows = n_strips * strip if rows is None else rows
    return _matmul_over(x, lambda i, k: wp[i // strip, k, i % strip], rows, bias, name, lora, residual, rope)


def prefix_matmul_q(
    x: te.Tensor,
    q: te.Tensor,
    scale: te.Tensor,
    fmt: Format,
    rows=None,
    bias: te.Tensor | None = None,
    name: str = "matmul",
    lora=None,
    minimum: te.Tensor | None = None,
    residual: te.Tensor | None = None,
    rope=None,
):
    """`prefix_matmul` (its bias, adapter, residual and rotation too) over group-quantized weights: no unpacked weight
    ever reaches memory.

    x: (T, K_active), K_active a whole number of groups. q: (M / strip, K / per, strip) uint32, `per` = 32 / bits
    weights per word (lowest bits first); scale and, for an asymmetric format, minimum: (M / strip, K / group,
    strip) float32, or uint16 fp16 bits in a `half` format (compile/quantize.py). W[i, k] = (level(i, k) - qmax)
    * scale (symmetric) or level(i, k) * scale + minimum (asymmetric), of the group of k in row i; level = the
    k-th field of the word.
    Returns (T, rows), rows defaulting to M.

    One token (decode) reads each weight once, so the kernel works on the levels as they unpack: per group,
    p = sum_k x[k] * level[i, k] and s = sum_k x[k] (blocks QPART, QXSUM), then scale * (p - qmax * s), or
    scale * p + minimum * s: one multiply by the scale per group, not per weight. Several tokens (prefill) reuse
    each weight T times: one strip at a time is dequantized into a scratch tile (block DEQUANT, K_active x strip,
    cache-resident), which the fp32 register tile then reads for every token.
    """
    n_strips, _, strip = q.shape
    rows = n_strips * strip if rows is None else rows
    T, K_active = x.shape
    group = fmt.group

    if not (isinstance(T, tirx.IntImm) and T.value == 1):
        dq = te.compute(
            (n_strips, K_active, strip),
            lambda j, k, i: _weight(fmt, q, scale, minimum, j, k, i),
            name=blocks.of(name, blocks.DEQUANT),
        )
        return _matmul_over(x, lambda i, k: dq[i // strip, k, i % strip], rows, bias, name, lora, residual, rope)
    groups = K_active // group
    kk = te.reduce_axis((0, group), "kk")

    def product(t, g, i):
        k = g * group + kk
        field, factor = _field_in_place(q, fmt, i // strip, k, i % strip)
        return x[t, k] * factor * field

    part = te.compute(
        (T, groups, rows), lambda t, g, i: te.sum(product(t, g, i), axis=kk), name=blocks.of(name, blocks.QPART)
    )
    kx = te.reduce_axis((0, group), "kx")
    xsum = te.compute(
        (T, groups), lambda t, g: te.sum(x[t, g * group + kx], axis=kx), name=blocks.of(name, blocks.QXSUM)
    )
    g = te.reduce_axis((0, groups), "g")

    def per_group(t, i):
        j, c = i // strip, i % strip
        if fmt.asymmetric:
            return as_f32(scale[j, g, c]) * part[t, g, i] + as_f32(minimum[j, g, c]) * xsum[t, g]
        return as_f32(scale[j, g, c]) * (part[t, g, i] - float(fmt.qmax) * xsum[t, g])

    y = te.compute((T, rows), lambda t, i: te.sum(per_group(t, i), axis=g), name=name)
    return _output(x, y, bias, name, lora, residual, rope)


def embed_q(ids: te.Tensor, q: te.Tensor, scale: te.Tensor, fmt: Format, minimum: te.Tensor | None = None):
    """Rows `ids` of a quantized embedding (vocab, d) in the strip layout of `prefix_matmul_q`, dequantized: only
    the looked-up rows are unpacked. (T,) int32 -> (T, d)."""
    _, words, strip = q.shape

    def row(t, k):
        v = ids[t]
        return _weight(fmt, q, scale, minimum, v // strip, k, v % strip)

    return te.compute((ids.shape[0], words * fmt.per_word), row, name=blocks.EMBED)


def _weight(fmt: Format, q: te.Tensor, scale: te.Tensor, minimum: te.Tensor | None, j, k, i):
    """The dequantized weight of input k in row i of strip j."""
    level, step = _level(q, fmt, j, k, i), as_f32(scale[j, k // fmt.group, i])
    if fmt.asymmetric:
        return level * step + as_f32(minimum[j, k // fmt.group, i])
    return (level - float(fmt.qmax)) * step


# whether `as_f32` widens fp16 bits with the target's own conversion instruction (`native_half`)
_NATIVE_HALF: ContextVar[bool] = ContextVar("native_half", default=False)


@contextlib.contextmanager
def native_half(enabled: bool):
    """Operators built inside read fp16 bits through the target's fp16 -> fp32 conversion (`enabled`: CPUs that
    have one in hardware, x86 with F16C and every aarch64; one instruction per vector, where the integer widening
    takes five) or with integer operations (else: OpenCL without cl_khr_fp16 has no half type at all)."""
    token = _NATIVE_HALF.set(enabled)
    try:
        yield
    finally:
        _NATIVE_HALF.reset(token)


def as_f32(value):
    """A stored value (a scale, a minimum, an adapter entry) as fp32; uint16 holds fp16 bits. Under `native_half`
    they are reinterpreted as fp16 and converted; otherwise widened with integer operations only, so no target
    needs fp16 support: the sign moves to bit 31, exponent and mantissa move up 13 bits, which reads them as an
    fp32 with an exponent 112 too small (127 - 15), normal or not, and multiplying by 2^112 restores it. Both are
    exact for every finite fp16."""
    if value.dtype != "uint16":
        return value
    if _NATIVE_HALF.get():
        return tirx.reinterpret("float16", value).astype("float32")
    h = value.astype("uint32")
    bits = ((h & tirx.const(0x8000, "uint32")) << tirx.const(16, "uint32")) | (
        (h & tirx.const(0x7FFF, "uint32")) << tirx.const(13, "uint32")
    )
    return tirx.reinterpret("float32", bits) * tirx.const(2.0**112, "float32")


def _field_in_place(q: te.Tensor, fmt: Format, j, k, i):
    """The stored level of input k in row i of strip j as (a float, its factor): the level times 2^(bits * f)
    for field f = k % per masked where it lies in its word, and the factor 2^-(bits * f) that undoes it (the
    top field is shifted down instead, factor 1). Both are exact (a few significant bits scaled by a power of
    two), so x * factor * field equals x * level bit for bit; one vector AND per weight instead of a shift and
    an AND. Decode's unrolled group loop makes f and the factor constants; x * factor is a scalar per input."""
    per, bits, mask = fmt.per_word, fmt.bits, (1 << fmt.bits) - 1
    f = k % per
    word = q[j, k // per, i]
    top = tirx.const((per - 1) * bits, "uint32")
    masked = word & (tirx.const(mask, "uint32") << (f * bits).astype("uint32"))
    field = tirx.Select(f == per - 1, word >> top, masked)
    factor = tirx.const(1.0, "float32")
    for v in range(per - 1):
        factor = tirx.Select(f == v, tirx.const(2.0 ** -(bits * v), "float32"), factor)
    # int32 first: the fields fit in 31 bits, and a signed conversion is one instruction where unsigned is not
    return field.astype("int32").astype("float32"), factor


def _level(q: te.Tensor, fmt: Format, j, k, i):
    """The stored level (0 .. fmt.top, float) of input k in row i of strip j: field k % per of word k // per, the
    lowest bits first (compile/quantize.py)."""
    per, mask = fmt.per_word, (1 << fmt.bits) - 1
    word = q[j, k // per, i]
    return ((word >> ((k % per) * fmt.bits).astype("uint32")) & tirx.const(mask, "uint32")).astype("float32")


def lm_head(x: te.Tensor, w: te.Tensor):
    """logits[t, v] = sum_k x[t, k] * w[v, k]: (T, d) x (vocab, d) -> (T, vocab); w is the (tied) embedding."""
    T, d = x.shape
    k = te.reduce_axis((0, d), "k")
    return te.compute((T, w.shape[0]), lambda t, v: te.sum(x[t, k] * w[v, k], axis=k), name=blocks.LM_HEAD)


def rms_norm(x: te.Tensor, w: te.Tensor, eps: float):
    """x * rsqrt(mean(x^2) + eps) * w over the last axis: (T, d) -> (T, d)."""
    T, d = x.shape
    k = te.reduce_axis((0, d), "k")
    sq = te.compute((T,), lambda t: te.sum(x[t, k] * x[t, k], axis=k), name=blocks.RMS_SUMSQ)
    return te.compute(
        (T, d), lambda t, i: x[t, i] * tirx.rsqrt(sq[t] / float(int(d)) + eps) * w[i], name=blocks.RMS_NORM
    )


def _angle(t, j, past, theta: float, head_dim: int):
    """The rotary angle of position past + t in frequency j (< head_dim / 2), fp32."""
    inv_freq = 1.0 / tirx.power(tirx.const(theta, "float32"), (j * 2).astype("float32") / head_dim)
    return (t + past).astype("float32") * inv_freq


def rope(x: te.Tensor, past, theta: float, head_dim: int):
    """Rotary embedding of (T, H*hd) at positions past .. past+T-1, rotate-half convention, fp32 angles."""
    T, width = x.shape
    half = head_dim // 2

    def f(t, c):
        j = c % head_dim
        pair = tirx.if_then_else(j < half, -x[t, c + half], x[t, c - half])
        a = _angle(t, j % half, past, theta, head_dim)
        return x[t, c] * tirx.cos(a) + pair * tirx.sin(a)

    return te.compute((T, width), f, name=blocks.ROPE)


def rope_table(x: te.Tensor, past, theta: float, head_dim: int):
    """cos (first half) and sin (second half) of the rotary angles at positions past .. past+T-1 of x (T, ...):
    (T, head_dim), computed once per forward and read by every projection that rotates its output in its own
    kernel (`prefix_matmul(rope=)`), instead of a rope kernel per projection."""
    half = head_dim // 2

    def f(t, c):
        a = _angle(t, c % half, past, theta, head_dim)
        return tirx.if_then_else(c < half, tirx.cos(a), tirx.sin(a))

    return te.compute((x.shape[0], head_dim), f, name=blocks.ROPE_TABLE)


def silu_mul(gate: te.Tensor, up: te.Tensor):
    """silu(gate) * up, exp(-gate) from topi's polynomial exp, which vectorises (libm's expf is a call per
    element: 12M calls in a 256-token prefill); the CPU schedule inlines its blocks into this one."""
    neg = te.compute(gate.shape, lambda t, i: -gate[t, i], name=blocks.NEG_GATE)
    e = topi.fast_exp(neg)
    return te.compute(gate.shape, lambda t, i: gate[t, i] / (1 + e[t, i]) * up[t, i], name=blocks.SILU_MUL)


ATTENTION_BLOCK = 64  # the key axis is computed in whole blocks of 64 positions (vectorisable, no remainder)


def attention(
    q: te.Tensor, k_cache_t: te.Tensor, v_cache: te.Tensor, past, head_dim: int, num_kv_heads: int, group: int | None
):
    """Causal GQA attention of T new queries over cache positions [0, past+T).

    q: (T, h*hd) with h active query heads (any prefix). Query head j reads KV head j % n_kv (interleaved map,
    group=None) or j // group (Hugging Face block map). k_cache_t: (n_kv*hd, max_len), keys stored transposed so
    that q.k vectorises over positions; v_cache: (max_len, n_kv*hd). Rows/columns [0, past+T) are valid; q.k is
    computed up to the next multiple of ATTENTION_BLOCK (max_len is one) and the extra positions are masked, so
    the caches must hold finite values there (the runtime zeroes them once). Returns (T, h*hd).
    """
    T, width = q.shape
    h = width // head_dim

    def kv(j):
        return j % num_kv_heads if group is None else j // group

    S = past + T
    S_blocks = (S + ATTENTION_BLOCK - 1) // ATTENTION_BLOCK * ATTENTION_BLOCK
    T_blocks = _token_blocks(T)
    scale = 1.0 / head_dim**0.5
    d = te.reduce_axis((0, head_dim), "d")
    dot = te.compute(  # rows t >= T (prefill padding) repeat the last query and are never read
        (h, T_blocks, S_blocks),
        lambda j, t, s: te.sum(q[tirx.min(t, T - 1), j * head_dim + d] * k_cache_t[kv(j) * head_dim + d, s], axis=d),
        name=blocks.QK,
    )
    # the softmax chain keeps the padded query rows too, so every stage tiles the same way; only `attention`
    # (the output) stops at T
    # a select, not an if_then_else: both sides are safe to compute (dot spans whole blocks), and a branch per
    # lane kept LLVM from vectorising the max and exp that inline it (decode attention 2-3x slower)
    score = te.compute(
        (h, T_blocks, S_blocks),
        lambda j, t, s: tirx.Select(s <= past + t, dot[j, t, s] * scale, tirx.const(-1e30, "float32")),
        name=blocks.SCORE,
    )
    s1 = te.reduce_axis((0, S_blocks), "s1")
    peak = te.compute((h, T_blocks), lambda j, t: te.max(score[j, t, s1], axis=s1), name=blocks.PEAK)
    shifted = te.compute((h, T_blocks, S_blocks), lambda j, t, s: score[j, t, s] - peak[j, t], name=blocks.SHIFTED)
    # topi's polynomial exp vectorises (libm's expf does not); masked scores clamp to exp(-88) ~ 4e-39
    prob = topi.fast_exp(shifted)  # (h, T_blocks, S_blocks)
    s2 = te.reduce_axis((0, S_blocks), "s2")
    total = te.compute((h, T_blocks), lambda j, t: te.sum(prob[j, t, s2], axis=s2), name=blocks.TOTAL)
    s3 = te.reduce_axis((0, S), "s3")
    weighted = te.compute(
        (T_blocks, width),
        lambda t, c: te.sum(
            prob[c // head_dim, t, s3] * v_cache[s3, kv(c // head_dim) * head_dim + c % head_dim], axis=s3
        ),
        name=blocks.PV,
    )
    return te.compute((T, width), lambda t, c: weighted[t, c] / total[c // head_dim, t], name=blocks.ATTENTION)


def lora_prefix(x: te.Tensor, y: te.Tensor, a: te.Tensor, bt: te.Tensor):
    """y + x @ A[:, :K_active]^T @ Bt[:, :rows]: a level's low-rank update, added to the prefix matmul y (T, rows)
    of the same projection, as a kernel of its own (GPU targets; CPU kernels fuse it, `prefix_matmul(lora=)`).

    x: (T, K_active); a: (r, K) and bt: (M / strip, r, strip), the adapter at full width with B transposed in
    strips (`_lora_up`) and the LoRA scale folded in; only the active prefix of each is read. r is the call's
    rank: 0 for a level without an adapter, which then costs no work.
    """
    T, _ = x.shape
    rows = y.shape[1]
    T_blocks = _token_blocks(T)
    up = _lora_up(_lora_down(x, a, "lora"), bt, T, (T_blocks, rows), "lora")
    return te.compute((T, rows), lambda t, i: y[t, i] + _lora_term(up, bt, t, i), name=blocks.LORA_OUT)
