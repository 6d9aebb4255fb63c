"""Hand schedules for the elastic operators on CPUs (the dlight CPU rules are 10-100x slower here).

Kernels are recognised by their block names (elastic_ops/blocks.py, set by the operators in prefix.py). Symbolic
extents stay symbolic: widths
arrive as whole blocks (heads * 64 outputs, neuron blocks * 64), so splitting the output axis by the register
tile leaves no remainder and the inner loop vectorises; the token axis of prefill is padded to the tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.sym.analyzer import Analyzer

from elastilm.elastic_ops import blocks, prefix

LANES = 16  # fp32 lanes of one AVX-512 register; LLVM splits it for narrower ISAs
STRIP_VECTORS = prefix.STRIP // LANES  # one register tile spans one packed weight strip when it fits
# fp32 values a register tile may accumulate: half the vector register file, the rest holding the broadcast inputs
# and the loaded weights. A tile of 4 tokens x one strip (256 values) fits AVX-512's 32 x 16 lanes; on AVX2
# (16 x 8) and NEON (32 x 4) it would spill every accumulator, so tiles there span a quarter strip.
AVX512_ACCUMULATORS = 32 * 16 // 2
# The scope of the accumulator tiles (register tiles, a group's partial sums, the adapter's update). A CPU buffer
# of constant size under 1 KB becomes a stack array in "global" scope, which LLVM keeps in registers, and a heap
# workspace per parallel task in "local" scope, which it cannot (decode 8-14% slower; docs/tvm-notes.md section 17).
TILE_SCOPE = "global"


def _is_one(extent) -> bool:
    return isinstance(extent, tirx.IntImm) and extent.value == 1


def _divisible(extent, factor: int) -> bool:
    return Analyzer().can_prove_equal(tirx.floormod(extent, factor), 0)


def _parallel_vectorized(sch: s_tir.Schedule, block, parallel: bool = True) -> None:
    """An elementwise block: outer loops fused and parallel (unless not `parallel`), the innermost vectorised when
    it divides."""
    loops = sch.get_loops(block)
    if len(loops) > 1 and _divisible(sch.get(loops[-1]).extent, LANES):
        _, inner = sch.split(loops[-1], [None, LANES])
        sch.vectorize(inner)
        loops = sch.get_loops(block)[:-1]
    if parallel:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def _one_token(sch: s_tir.Schedule, name: str) -> bool:
    """Whether block `name` computes one token (decode's static extent): then its elementwise work (a norm, an
    activation, a softmax's max, sum and exp over a few hundred positions) runs serially, since waking the other
    threads for a parallel loop costs about 1.2 us here, more than the work."""
    return _is_one(sch.get(sch.get_loops(sch.get_sblock(name))[0]).extent)


def _register_tile(
    sch: s_tir.Schedule, block, t, v, k, tokens: int, vectors: int, lead=(), spread: bool = False
) -> None:
    """Accumulate (tokens x vectors*LANES) outputs in registers along the reduction loop k, vectorised over v.
    Parallel over the tiles; output blocks outermost (so a weight strip stays in cache across token tiles),
    or, with `lead` loops (e.g. heads), those first and the output blocks serial inside, unless `spread` makes
    them parallel too (one head has work for every core)."""
    outer, acc_at, k = _tile(sch, t, v, k, tokens, vectors, lead)
    if spread and lead:
        outer = acc_at = sch.fuse(outer, acc_at)
    sch.parallel(outer)
    acc = sch.cache_write(block, 0, TILE_SCOPE)
    sch.reverse_compute_at(acc, acc_at)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.decompose_reduction(block, k)


def _tile(sch: s_tir.Schedule, t, v, k, tokens: int, vectors: int, lead=(), dequant: bool = False):
    """Register-tile loops over (t, v, reduction k): (tokens x vectors*LANES) outputs accumulated along k, the
    token and vector loops unrolled, the lanes vectorised. Returns (the loop over the tiles, the loop a tile's
    output joins, k): one loop over (output block, token tile); with `lead` loops (e.g. heads) those first and
    the output blocks inside; with `dequant`, (output block, chunk of DEQUANT_TILES token tiles) and the tiles
    inside. Nothing is parallel yet (loops are merged first, then made parallel)."""
    to, ti = sch.split(t, [None, tokens])
    vo, vv, vi = sch.split(v, [None, vectors, LANES])
    if lead:
        sch.reorder(*lead, to, vo, k, ti, vv, vi)
        outer, tile = sch.fuse(*lead, to), vo
    elif dequant:
        tc, to = sch.split(to, [None, DEQUANT_TILES])
        sch.reorder(vo, tc, to, k, ti, vv, vi)
        outer, tile = sch.fuse(vo, tc), to
    else:
        sch.reorder(vo, to, k, ti, vv, vi)
        outer = tile = sch.fuse(vo, to)
    sch.unroll(ti)
    sch.unroll(vv)
    sch.vectorize(vi)
    return outer, tile, k


def _tokens(sch: s_tir.Schedule, t) -> int:
    return 1 if _is_one(sch.get(t).extent) else prefix.TOKEN_BLOCK


def accumulators(target: tvm.target.Target) -> int:
    """The register tile budget (fp32 values) for `target`'s vector registers: AVX-512, NEON (aarch64), AVX2, or
    SSE."""
    from tvm.target.codegen import target_has_features

    if target_has_features("avx512f", target):
        return AVX512_ACCUMULATORS
    if target_has_features("neon", target):
        return 32 * 4 // 2
    if target_has_features("avx2", target) or target_has_features("avx", target):
        return 16 * 8 // 2
    return 16 * 4 // 2


def _vectors(tokens: int, budget: int, most: int = STRIP_VECTORS) -> int:
    """LANES-wide vectors per register tile row: the most (up to `most`, halving) whose tokens x vectors x LANES
    accumulators fit `budget`; at least one."""
    v = most
    while v > 1 and tokens * v * LANES > budget:
        v //= 2
    return v


DEQUANT_TILES = 16  # token tiles that reuse one dequantized strip (a quantized prefill), 64 tokens


def _matmul(sch: s_tir.Schedule, name: str, budget: int) -> None:
    """y[t, i] = sum_k x[t, k] * W[i, k], W packed in strips of 64 outputs: one register tile spans one strip, or
    the part of one that fits `budget` accumulators; the output block (bias, crop of padded tokens) is computed
    per tile from the registers.

    Quantized weights (prefix.prefix_matmul_q): one token reduces over groups, each group's partial sums
    (QPART) computed in registers as the words unpack, the input sums (QXSUM) once, serially; several tokens
    dequantize a strip into a scratch tile (DEQUANT) per chunk of DEQUANT_TILES token tiles, parallel over
    (strip, chunk) so that a level with one strip still uses every core.

    The adapter's update (prefix._output) is part of the same kernel: x @ A^T (LORA_A) once per call, then the
    rank-r product with Bt (LORA_B) tiled like y, its tile loops merged with y's so that the output block adds
    both from registers. At rank 0 (no adapter) both reductions are empty."""
    out = sch.get_sblock(name + "_out")
    tiles = _strip_tiles(sch, name, budget)
    if tiles is None:  # widths that are not whole strips (tiny models)
        _parallel_vectorized(sch, out)
        return
    _spread(sch, [name], tiles.outer)
    sch.reverse_compute_at(out, tiles.tile)
    sch.vectorize(sch.get_loops(out)[-1])
    _reduce_in_registers(sch, name, tiles)
    if name + blocks.ROTATED in _names(sch) and tiles.tokens > 1:  # q's and k's rotation (serial for one token)
        sch.parallel(sch.get_loops(sch.get_sblock(name + blocks.ROTATED))[0])


def _pair(sch: s_tir.Schedule, names: tuple[str, str], budget: int) -> None:
    """Two prefix matmuls of one input in one kernel, of the same width: k and v (their outputs `<name>_out`,
    k's rotation after them), or gate and up with silu_mul multiplying them. One token: both tiled as in
    `_matmul`, their tile loops merged, so that one parallel loop computes a strip of each in registers (and, for
    gate and up, multiplies them there: their output blocks are inlined into silu_mul). Several tokens: each
    matmul as `_matmul` schedules it, then silu_mul, parallel loops one after the other in one kernel (merged,
    two dequantized strips per task made prefill 5-7% slower)."""
    gated = blocks.SILU_MUL in _names(sch)
    if not _one_token(sch, names[0]):
        for name in names:
            _matmul(sch, name, budget)
        if gated:
            _parallel_vectorized(sch, sch.get_sblock(blocks.SILU_MUL))
        return
    tiles = [_strip_tiles(sch, name, budget) for name in names]
    if gated:
        for name in names:
            sch.compute_inline(sch.get_sblock(name + "_out"))
    outputs = [sch.get_sblock(blocks.SILU_MUL)] if gated else [sch.get_sblock(n + "_out") for n in names]
    if tiles[0] is None:
        for out in outputs:
            _parallel_vectorized(sch, out, parallel=False)
        return
    if not gated:  # each output joins its own tiles first (placed after the merge, one got the whole width)
        for out, t in zip(outputs, tiles):
            sch.reverse_compute_at(out, t.outer)
            sch.vectorize(sch.get_loops(out)[-1])
    order = _order(sch)
    first, second = sorted(zip(names, tiles), key=lambda pair: order.index(pair[0]))
    outer = sch.merge(first[1].outer, second[1].outer)  # it takes the place of the later loop
    _check_order(sch, names)
    _spread(sch, names, outer)
    if gated:
        sch.reverse_compute_at(outputs[0], outer)
        sch.vectorize(sch.get_loops(outputs[0])[-1])
    for name, t in zip(names, tiles):
        _reduce_in_registers(sch, name, t)


def _order(sch: s_tir.Schedule) -> list[str]:
    """The kernel's block names in the order they run."""
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _check_order(sch: s_tir.Schedule, names) -> None:
    """Check that two merged matmuls' helpers (x @ A^T, the input sums) run before their tiles and k's rotation
    after them. A merged loop takes the place of the later loop merged, so what ran between the two moves with
    it: k's rotation when the operator computes k before v (compile/export.py computes v first)."""
    order = _order(sch)
    start = min(order.index(n) for n in names)
    for name in names:
        for helper in (blocks.LORA_A, blocks.QXSUM):
            at = [i for i, b in enumerate(order) if b.startswith(blocks.of(name, helper))]
            if at and max(at) > start:
                raise ValueError(f"{blocks.of(name, helper)} would run after the tiles that read it")
        if name + blocks.ROTATED in order and order.index(name + blocks.ROTATED) < start:
            raise ValueError(f"{name + blocks.ROTATED} would run before the tiles it reads: compute v before k")


# the matmuls that share a kernel (compile/export.py): one input, the same width
PAIRS = (("gate_proj", "up_proj"), ("k_proj", "v_proj"))


def _norm(sch: s_tir.Schedule, names) -> None:
    """An RMSNorm (sum of squares, then the scaled output), alone or in the prologue of a projection's kernel:
    parallel, except for one token (`_one_token`)."""
    if blocks.RMS_SUMSQ in names and not _one_token(sch, blocks.RMS_SUMSQ):
        sch.parallel(sch.get_loops(sch.get_sblock(blocks.RMS_SUMSQ))[0])
    if blocks.RMS_NORM in names:
        _parallel_vectorized(sch, sch.get_sblock(blocks.RMS_NORM), not _one_token(sch, blocks.RMS_NORM))


@dataclass
class _Tiles:
    """A tiled matmul's loops (`_strip_tiles`)."""

    outer: s_tir.LoopRV  # over the tiles (made parallel by `_spread`)
    tile: s_tir.LoopRV  # the loop a tile's output joins
    k: s_tir.LoopRV  # the reduction (groups, for a quantized decode)
    j: s_tir.LoopRV | None  # the adapter's rank reduction
    tokens: int
    vectors: int


def _names(sch: s_tir.Schedule) -> set[str]:
    return {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}


def _strip_tiles(sch: s_tir.Schedule, name: str, budget: int) -> _Tiles | None:
    """The register-tile loops of matmul `name` and of its adapter's update, merged (`_matmul`); None (and the
    matmul parallel over its outputs) where the width is not whole strips."""
    block = sch.get_sblock(name)
    t, i, k = sch.get_loops(block)
    names = _names(sch)
    if not _divisible(sch.get(i).extent, STRIP_VECTORS * LANES):
        sch.parallel(sch.fuse(t, i))
        return None
    tokens = _tokens(sch, t)
    # (a quantized decode keeps a group's partial sums beside these: halving its tile for AVX2 was 10-35% slower)
    vectors = _vectors(tokens, budget)
    dequant = blocks.of(name, blocks.DEQUANT) in names
    outer, tile, k = _tile(sch, t, i, k, tokens, vectors, dequant=dequant)
    j = None
    if blocks.of(name, blocks.LORA_A) in names:
        _dot_rows(sch, blocks.of(name, blocks.LORA_A), parallel_loops=1 if tokens > 1 else 0)
        up = sch.get_sblock(blocks.of(name, blocks.LORA_B))
        up_outer, up_tile, j = _tile(sch, *sch.get_loops(up), tokens, vectors, dequant=dequant)
        outer = sch.merge(outer, up_outer)
        tile = sch.merge(tile, up_tile) if dequant else outer
        sch.set_scope(up, 0, TILE_SCOPE)
    return _Tiles(outer, tile, k, j, tokens, vectors)


def _spread(sch: s_tir.Schedule, names, outer) -> None:
    """The loop over tiles parallel, each quantized prefill's strip dequantized inside it."""
    for name in names:
        if blocks.of(name, blocks.DEQUANT) in _names(sch):
            dq = sch.get_sblock(blocks.of(name, blocks.DEQUANT))
            sch.compute_at(dq, outer)
            sch.vectorize(sch.get_loops(dq)[-1])
    sch.parallel(outer)


def _reduce_in_registers(sch: s_tir.Schedule, name: str, tiles: _Tiles) -> None:
    """The accumulators of matmul `name` (and of its group partial sums and adapter update) in tile scope, their
    initialisation outside the reduction loops."""
    block = sch.get_sblock(name)
    sch.set_scope(block, 0, TILE_SCOPE)
    if blocks.of(name, blocks.QPART) in _names(sch):
        part = sch.get_sblock(blocks.of(name, blocks.QPART))
        sch.compute_at(part, tiles.k)  # k is the group loop
        sch.set_scope(part, 0, TILE_SCOPE)
        *_, pi, pk = sch.get_loops(part)
        pv, pl = sch.split(pi, [tiles.vectors, LANES])
        sch.reorder(pk, pv, pl)
        sch.unroll(pk)
        sch.unroll(pv)
        sch.vectorize(pl)
        sch.decompose_reduction(part, pk)
    if tiles.j is not None:
        sch.decompose_reduction(sch.get_sblock(blocks.of(name, blocks.LORA_B)), tiles.j)
    sch.decompose_reduction(block, tiles.k)


def _dot_rows(sch: s_tir.Schedule, name: str, parallel_loops: int) -> None:
    """A reduction over a contiguous last axis (logits[t, v] = x[t, :] . w[v, :], or q . k): the reduction is
    split into LANES partial sums (rfactor) that vectorise, summed once per output; parallel over the first
    `parallel_loops` loops (0: serial, for work too small to pay for waking the threads)."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    if not _divisible(sch.get(loops[-1]).extent, LANES):
        if parallel_loops:
            sch.parallel(sch.fuse(*loops[:parallel_loops]))
        return
    ko, ki = sch.split(loops[-1], [None, LANES])
    rf = sch.rfactor(ki, factor_axis=len(loops) - 1)
    sch.compute_at(rf, sch.get_loops(block)[len(loops) - 2])
    lanes, partial = sch.get_loops(rf)[-2:]
    sch.reorder(partial, lanes)
    sch.vectorize(lanes)
    if parallel_loops:
        sch.parallel(sch.fuse(*sch.get_loops(block)[:parallel_loops]))


def _weighted_sum(sch: s_tir.Schedule, name: str, budget: int) -> None:
    """pv[t, c] = sum_s prob[head(c), t, s] * v[s, kv(c)*hd + c%hd]: c is contiguous in the V cache."""
    block = sch.get_sblock(name)
    t, c, s = sch.get_loops(block)
    if not _divisible(sch.get(c).extent, 4 * LANES):
        sch.parallel(sch.fuse(t, c))
        return
    tokens = _tokens(sch, t)
    # decode: half a head per tile, so that a level with one or three heads still gives every core work
    _register_tile(sch, block, t, c, s, tokens, _vectors(tokens, budget, 4 if tokens > 1 else 2))


def _scores(sch: s_tir.Schedule, budget: int) -> None:
    """qk[j, t, s] = sum_d q[t, j*hd+d] * kt[kv(j)*hd+d, s]: keys are stored transposed, so positions s are
    contiguous. The key extent is whole blocks of 64; parallel over (head, token tile, block of keys)."""
    block = sch.get_sblock(blocks.QK)
    j, t, s, d = sch.get_loops(block)
    tokens = _tokens(sch, t)
    _register_tile(sch, block, t, s, d, tokens, _vectors(tokens, budget, 4), lead=(j,), spread=True)


def _attention(sch: s_tir.Schedule, budget: int) -> None:
    """q.k and p.v tiled and parallel; the softmax between them and the final division parallel too, except for
    one token (`_one_token`)."""
    several = not _one_token(sch, blocks.ATTENTION)
    sch.compute_inline(sch.get_sblock(blocks.SCORE))
    sch.compute_inline(sch.get_sblock(blocks.SHIFTED))
    _scores(sch, budget)
    for name in (blocks.PEAK, blocks.TOTAL):
        _dot_rows(sch, name, parallel_loops=2 if several else 0)
    _parallel_vectorized(sch, sch.get_sblock(blocks.FAST_EXP), several)
    _weighted_sum(sch, blocks.PV, budget)
    _parallel_vectorized(sch, sch.get_sblock(blocks.ATTENTION), several)


def schedule_function(func: tirx.PrimFunc, budget: int = AVX512_ACCUMULATORS) -> tirx.PrimFunc:
    """One kernel of the elastic model, its register tiles sized for `budget` accumulators (`accumulators`)."""
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # hand-written kernels without a root block (the KV append) stay as written
        return func
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    if blocks.SILU_MUL in names:  # its exp's blocks, elementwise, join it
        for name in (blocks.NEG_GATE, blocks.FAST_EXP):
            sch.compute_inline(sch.get_sblock(name))
        names = [n for n in names if n not in (blocks.NEG_GATE, blocks.FAST_EXP)]
    if blocks.QK in names:
        _attention(sch, budget)
        return sch.mod["main"]
    _norm(sch, names)
    pair = next((p for p in PAIRS if set(p) <= set(names)), None)
    if pair:
        _pair(sch, pair, budget)
        return sch.mod["main"]
    for name in names:
        if name in blocks.LINEAR or (name == blocks.LM_HEAD and name + "_out" in names):  # quantized head
            _matmul(sch, name, budget)
        elif name == blocks.LM_HEAD:
            _dot_rows(sch, name, parallel_loops=2)
        elif name in (blocks.EMBED, *blocks.ELEMENTWISE) and name != blocks.RMS_NORM:
            _parallel_vectorized(sch, sch.get_sblock(name), not _one_token(sch, name))
    return sch.mod["main"]


def schedule_dense(func: tirx.PrimFunc, budget: int = AVX512_ACCUMULATORS) -> tirx.PrimFunc:
    """Kernels of a plain dense model legalized from Relax's generic operators (the TLM's BERT): every matmul
    (block "matmul*", loops [batch...,] i, j, k with j contiguous in the weight) register-tiled; other blocks
    parallel over their spatial loops, vectorised where they are elementwise."""
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:
        return func
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        if not loops:
            continue
        spatial = sum(1 for iv in sch.get(block).iter_vars if int(iv.iter_type) == 0)
        if sch.get(block).name_hint.startswith("matmul") and spatial >= 2 and spatial == len(loops) - 1:
            *lead, i, j, k = loops
            most = next((v for v in (4, 2, 1) if _divisible(sch.get(j).extent, v * LANES)), 0)
            vectors = _vectors(prefix.TOKEN_BLOCK, budget, most) if most else 0
            if vectors and _divisible(sch.get(i).extent, prefix.TOKEN_BLOCK):
                _register_tile(sch, block, i, j, k, prefix.TOKEN_BLOCK, vectors, lead=tuple(lead))
            else:
                sch.parallel(sch.fuse(*loops[:-1]))
        elif spatial == len(loops):
            _parallel_vectorized(sch, block)
        elif spatial >= 1 and spatial < len(loops):
            sch.parallel(sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0])
    return sch.mod["main"]


def schedule_module(mod: tvm.IRModule, rule=schedule_function) -> tvm.IRModule:
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = rule(func)
    return mod


def pipeline(target: tvm.target.Target, rule=schedule_function) -> tvm.transform.Pass:
    """The Relax pipeline for CPUs: legalize, apply our schedules (`rule` per kernel; `schedule_dense` for the
    TLM), lower, register tiles sized for the target's vector registers. No operator fusion, so that every kernel
    keeps the schedule written for it."""
    from functools import partial

    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + [
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                ]
            )(mod)
            mod = schedule_module(mod, partial(rule, budget=accumulators(target)))
            mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)
        return mod

    return _pipeline
