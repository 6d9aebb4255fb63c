"""The elastic model in TVM Relax: one module, symbolic active widths, explicit KV cache.

Non-anchor layers run at `heads` active query heads and `neuron_blocks * block` active FFN neurons, both symbolic, so one
compiled library serves every level; anchor layers always run full width. Parameters are the full-width
reordered weights under Hugging Face names. Each layer has its own K cache (n_kv*hd, max_len) and V cache
(max_len, n_kv*hd), written in place; KV heads are never elastic, so the cache layout is the same at every level.

A quantized build (`ExportShape.quant`, formats/quant.py) stores every linear weight and the embedding table as
packed words and group scales (and minima, asymmetric formats) (compile/quantize.py); its kernels unpack them
inside the reduction.

Every projection of every layer also takes a LoRA adapter (A (r, in), B^T in strips (out/strip, r, strip); fp32, or
fp16 bits where the scheme says so) as an input beside the shared weights, read on the same prefix: a level's
adapter set is passed per call, so switching levels swaps adapter buffers only. The rank r is symbolic: a set of
rank 0 (tensors with no rows) runs the model without adapters, and its update loops do no work. On CPUs the update,
the residual add and the rotary embedding of q and k run inside the projection's kernel (`ExportShape.fuse_epilogues`;
the cos and sin of the rotation are computed once per forward).

Methods (batch 1), declared from formats/signature.py (the names and argument order the engine calls): `embed`
turns token ids into embeddings; `prefill` runs T new embeddings after `past` cached positions, `decode` one.
Both return the logits of the last position only (the LM head over all T positions would be wasted work) and the
caches; `score` is `prefill` returning the logits of all T positions, for likelihoods. The layer-dropping
baseline (compile/layer_drop.py) adds `prefill_drop<n>`, `decode_drop<n>` and `score_drop<n>` per variant: the
same signature, its dropped layers skipped (their caches passed through untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

from elastilm.compile.quantize import strips
from elastilm.elastic_ops import blocks, prefix
from elastilm.elastic_ops.cache import kv_append, kv_append_transposed
from elastilm.formats import quant, signature
from elastilm.formats.config import PROJECTIONS, ModelConfig, projection_names
from elastilm.formats.quant import Format, Scheme


@dataclass(frozen=True)
class ExportShape:
    """What the compiled library is specialised on, besides the model config."""

    anchors: tuple[int, ...]
    neuron_block: int  # FFN width granularity of non-anchor layers
    max_len: int  # context window = KV cache rows
    biases: frozenset[str] = frozenset()  # per-layer parameter suffixes that have a bias, e.g. "self_attn.q_proj"
    lora_rank: int = 8
    layer_drops: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (n, dropped layers): the layer-dropping baseline
    quant: str = "q0f32"  # the linear layers' weights (formats/quant.py)
    # the adapter's update and q's and k's rotation inside the projection's kernel (CPU schedules); else kernels of
    # their own (dlight's GPU rules want one reduction per kernel)
    fuse_epilogues: bool = True
    # fp16 bits (scales, minima, adapters) widened by the target's conversion instruction (elastic_ops.prefix.as_f32)
    native_half: bool = False


RANK = "lora_rank"  # the symbolic rank of a call's adapter set (formats/signature.py)


class _Linear(nn.Module):
    """A linear layer whose weight is packed in strips of output columns: fp32 (out/strip, in, strip) (see
    `kernel_layout`), or quantized in the format `fmt`: `q_weight` (out/strip, in/per_word, strip) uint32,
    `q_scale` and, asymmetric, `q_min` (out/strip, in/group, strip) (compile/quantize.py)."""

    def __init__(self, rows: int, cols: int, bias: bool, fmt: Format | None):
        strip = prefix.strip_width(rows)
        self.fmt = fmt
        if fmt is not None:
            self.q_weight = nn.Parameter((rows // strip, cols // fmt.per_word, strip), "uint32")
            groups = (rows // strip, cols // fmt.group, strip)
            self.q_scale = nn.Parameter(groups, fmt.scale_dtype)
            self.q_min = nn.Parameter(groups, fmt.scale_dtype) if fmt.asymmetric else None
        else:
            self.weight = nn.Parameter((rows // strip, cols, strip), "float32")
        self.bias = nn.Parameter((rows,), "float32") if bias else None

    def quantized(self) -> tuple:
        """The quantized weight's arrays, as the kernels take them: (q, scale, minimum or None)."""
        return self.q_weight, self.q_scale, self.q_min


class _Embedding(_Linear):
    """A (vocab, d) table, also the LM head when tied: fp32 rows, or quantized like `_Linear` (its strips over the
    vocabulary), so that the LM head reads 4 or 8 bits per weight and the gather unpacks the looked-up rows only."""

    def __init__(self, vocab: int, d: int, fmt: Format | None):
        if fmt is not None:
            super().__init__(vocab, d, False, fmt)
        else:
            self.fmt = fmt
            self.weight = nn.Parameter((vocab, d), "float32")

    def lookup(self, input_ids):
        fmt = self.fmt
        if fmt is None:
            return op.take(self.weight, input_ids, axis=0)
        return _te(lambda i, q, sc, mn: prefix.embed_q(i, q, sc, fmt, mn), "embed", input_ids, *self.quantized())

    def logits(self, h):
        """(T, d) -> (T, vocab)."""
        fmt = self.fmt
        if fmt is None:
            return _te(prefix.lm_head, "lm_head", h, self.weight)
        return _te(
            lambda h, q, sc, mn: prefix.prefix_matmul_q(h, q, sc, fmt, name=blocks.LM_HEAD, minimum=mn),
            "lm_head",
            h,
            *self.quantized(),
        )


def kernel_layout(name: str, tensor):
    """A checkpoint tensor (Hugging Face layout) in the layout the compiled kernels read: a linear weight
    (out, in) becomes strips (out/strip, in, strip), so that input and output prefixes are both contiguous and
    each strip streams from memory in one piece; a LoRA B (out, r) becomes strips (out/strip, r, strip) of B^T,
    so that a kernel's strip of outputs reads its r x strip share of the adapter in one piece too; everything
    else is unchanged."""
    if not name.endswith(("_proj.weight", ".lora_B")):
        return tensor
    return strips(tensor, prefix.strip_width(tensor.shape[0]))


class _Norm(nn.Module):
    def __init__(self, d: int):
        self.weight = nn.Parameter((d,), "float32")


def _linear(rows: int, cols: int, projection: str, biases, scheme: Scheme) -> _Linear:
    return _Linear(rows, cols, projection in biases, scheme.format(projection))


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, biases, scheme: Scheme):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(cfg.num_heads * hd, d, "self_attn.q_proj", biases, scheme)
        self.k_proj = _linear(cfg.num_kv_heads * hd, d, "self_attn.k_proj", biases, scheme)
        self.v_proj = _linear(cfg.num_kv_heads * hd, d, "self_attn.v_proj", biases, scheme)
        self.o_proj = _linear(d, cfg.num_heads * hd, "self_attn.o_proj", biases, scheme)


class _MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, biases, scheme: Scheme):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(f, d, "mlp.gate_proj", biases, scheme)
        self.up_proj = _linear(f, d, "mlp.up_proj", biases, scheme)
        self.down_proj = _linear(d, f, "mlp.down_proj", biases, scheme)


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, biases, scheme: Scheme):
        self.input_layernorm = _Norm(cfg.hidden_size)
        self.self_attn = _Attention(cfg, biases, scheme)
        self.post_attention_layernorm = _Norm(cfg.hidden_size)
        self.mlp = _MLP(cfg, biases, scheme)


class _Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, biases, scheme: Scheme):
        self.embed_tokens = _Embedding(cfg.vocab_size, cfg.hidden_size, scheme.format("model.embed_tokens"))
        self.layers = nn.ModuleList([_Layer(cfg, biases, scheme) for _ in range(cfg.num_layers)])
        self.norm = _Norm(cfg.hidden_size)


def _one_token(x) -> bool:
    """Whether the Relax tensor x (T, ...) holds one token: decode's static extent."""
    return isinstance(x.shape[0], int) and x.shape[0] == 1  # prefill: a symbolic seq_len


def _te(fn, name, *args):
    """One TE operator as a Relax call. Symbolic scalars (e.g. `past`) must be arguments, not closure variables,
    so that they become arguments of the generated kernel; None arguments (absent biases) are dropped."""
    tensors = [a for a in args if a is not None]
    present = [a is not None for a in args]

    def body(*ts):
        it = iter(ts)
        return fn(*[next(it) if p else None for p in present])

    return op.tensor_expr_op(body, name, tensors)


class ElasticRelaxModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: ExportShape):
        self.cfg, self.shape = cfg, shape
        scheme = quant.scheme(shape.quant)
        self.model = _Decoder(cfg, shape.biases, scheme)
        untied = not cfg.tie_word_embeddings
        self.lm_head = _Embedding(cfg.vocab_size, cfg.hidden_size, scheme.format("lm_head")) if untied else None

    def _linear(self, x, lin: _Linear, projection: str, lora, rows=None, residual=None, rope=None):
        """x (T, active inputs) -> (T, rows): a prefix of the inputs (from x's shape) and of the outputs (`rows`),
        plus the adapter `lora[projection]` = (A, B^T) on the same prefix, plus `residual` (T, rows) if given (the
        skip connection, added in the projection's kernel), rotated if `rope` (the forward's `rope_table`, or
        the past positions where the rotation is a kernel of its own) is given."""
        name = projection.split(".")[-1]  # the kernel's block name, e.g. "up_proj" (elastic_ops/blocks.py)
        fused = self.shape.fuse_epilogues
        compute, args = self._projection(lin, projection, lora, rows, residual, rope if fused else None)
        y = _te(compute, name, x, *args)
        if fused:
            return y
        y = _te(prefix.lora_prefix, "lora", x, y, *lora[projection])  # else kernels of their own
        if rope is None:
            return y
        hd = self.cfg.head_dim
        return _te(lambda t, p: prefix.rope(t, p, self.cfg.rope_theta, hd), "rope", y, rope)

    def _projection(self, lin: _Linear, projection: str, lora, rows, residual=None, table=None):
        """The TE operator of one projection (`_linear`) and its tensor arguments after x: a function of (x,
        *arguments), arguments that are None (no bias, no residual, an adapter outside the kernel) included."""
        name = projection.split(".")[-1]
        assert name in blocks.LINEAR, name
        fmt, hd = lin.fmt, self.cfg.head_dim
        a, bt = lora[projection] if self.shape.fuse_epilogues else (None, None)

        def adapter(a, bt):
            return None if a is None else (a, bt)

        def rotation(table):
            return None if table is None else (table, hd)

        if fmt is not None:
            return (
                lambda x, q, scale, mn, b, a, bt, res, tab: prefix.prefix_matmul_q(
                    x, q, scale, fmt, rows, b, name, adapter(a, bt), mn, res, rotation(tab)
                ),
                (*lin.quantized(), lin.bias, a, bt, residual, table),
            )
        return (
            lambda x, w, b, a, bt, res, tab: prefix.prefix_matmul(
                x, w, rows, b, name, adapter(a, bt), res, rotation(tab)
            ),
            (lin.weight, lin.bias, a, bt, residual, table),
        )

    def _gated(self, x, norm: _Norm, mlp: _MLP, lora, neurons):
        """silu(gate(h)) * up(h), (T, neurons), h = norm(x): with fused epilogues one kernel for gate, up and SiLU
        (one token: the norm in its prologue, a strip of gate and of up computed in one parallel task and
        multiplied there; several tokens: after a norm kernel, `_prologue`), else five."""
        if not self.shape.fuse_epilogues:
            h = self._norm(x, norm)
            gate = self._linear(h, mlp.gate_proj, "mlp.gate_proj", lora, neurons)
            up = self._linear(h, mlp.up_proj, "mlp.up_proj", lora, neurons)
            return _te(prefix.silu_mul, "silu_mul", gate, up)
        gate, gate_args = self._projection(mlp.gate_proj, "mlp.gate_proj", lora, neurons)
        up, up_args = self._projection(mlp.up_proj, "mlp.up_proj", lora, neurons)
        n = len(gate_args)

        def compute(x, w, *ts):
            h = self._rms_norm(x, w)
            return prefix.silu_mul(gate(h, *ts[:n]), up(h, *ts[n:]))

        return _te(compute, "gated_mlp", *self._prologue(x, norm), *gate_args, *up_args)

    def _attention_inputs(self, x, norm: _Norm, attn: _Attention, lora, heads, rope):
        """q (rotated), k (rotated) and v of h = norm(x): with fused epilogues, one token takes two kernels with
        the norm in the prologue of each (q; k and v, whose tiles run in one parallel loop), several tokens a norm
        kernel and one each for q, k and v (`_prologue`); else seven."""
        hd = self.cfg.head_dim
        if not self.shape.fuse_epilogues:
            h = self._norm(x, norm)
            q = self._linear(h, attn.q_proj, "self_attn.q_proj", lora, heads * hd, rope=rope)
            k = self._linear(h, attn.k_proj, "self_attn.k_proj", lora, rope=rope)
            return q, k, self._linear(h, attn.v_proj, "self_attn.v_proj", lora)
        to_q, q_args = self._projection(attn.q_proj, "self_attn.q_proj", lora, heads * hd, table=rope)
        to_k, k_args = self._projection(attn.k_proj, "self_attn.k_proj", lora, None, table=rope)
        to_v, v_args = self._projection(attn.v_proj, "self_attn.v_proj", lora, None)
        n = len(k_args)

        def vk(x, w, *ts):  # v first: k's rotation must follow the loop that computes both (schedule_cpu._check_order)
            h = self._rms_norm(x, w)
            return [to_v(h, *ts[n:]), to_k(h, *ts[:n])]

        x, w = self._prologue(x, norm)
        q = _te(lambda x, w, *ts: to_q(self._rms_norm(x, w), *ts), "norm_q_proj", x, w, *q_args)
        if w is None:  # several tokens: k and v apart (a kernel with two outputs made every prefill kernel slower)
            return q, _te(to_k, "k_proj", x, *k_args), _te(to_v, "v_proj", x, *v_args)
        v, k = _te(vk, "norm_kv_proj", x, w, *k_args, *v_args)
        return q, k, v

    def _prologue(self, x, norm: _Norm):
        """(x, the norm's weight) for kernels that normalise their own input, one token (decode: three kernel
        calls fewer per layer); several tokens get (norm(x), None) from a kernel of its own, which q, k and v read
        (in a prefill, k and v are kernels of their own: returning both from one kernel made every kernel of a
        SmolLM2 prefill about 2.7x slower, not only that one; docs/results-quantization.md)."""
        if _one_token(x):
            return x, norm.weight
        return self._norm(x, norm), None

    def _rms_norm(self, x, w):
        """RMSNorm of x with weight w, or x where w is None (normalised already, `_prologue`)."""
        return x if w is None else prefix.rms_norm(x, w, self.cfg.rms_norm_eps)

    def _norm(self, x, norm: _Norm):
        return _te(self._rms_norm, "rms_norm", x, norm.weight)

    def _layer(self, layer: _Layer, x, k_cache, v_cache, lora, past, rope, heads, neurons):
        """One decoder layer; `lora` maps a projection (e.g. "mlp.up_proj") to its adapter (A, B^T); `rope` is
        the forward's `rope_table` (fused epilogues), else `past`."""
        cfg, hd = self.cfg, self.cfg.head_dim
        a, m = layer.self_attn, layer.mlp
        group = None if cfg.kv_head_map == "interleaved" else cfg.group_size
        # (T, heads*hd) rotated, (T, n_kv*hd) rotated, (T, n_kv*hd)
        q, k, v = self._attention_inputs(x, layer.input_layernorm, a, lora, heads, rope)
        k_cache = op.tensor_ir_inplace_op(kv_append_transposed, "kv_append_t", [k_cache, k, past], [0], k_cache)
        v_cache = op.tensor_ir_inplace_op(kv_append, "kv_append", [v_cache, v, past], [0], v_cache)
        y = _te(
            lambda q, kc, vc, p: prefix.attention(q, kc, vc, p, hd, cfg.num_kv_heads, group),
            "attention",
            q,
            k_cache,
            v_cache,
            past,
        )  # (T, heads*hd)
        x = self._linear(y, a.o_proj, "self_attn.o_proj", lora, residual=x)  # (T, d)
        act = self._gated(x, layer.post_attention_layernorm, m, lora, neurons)  # (T, neurons)
        x = self._linear(act, m.down_proj, "mlp.down_proj", lora, residual=x)  # (T, d)
        return x, k_cache, v_cache

    def embed(self, input_ids):
        """Token embeddings (T, d): a gather of T rows, separate so callers may edit or compress them."""
        return self.model.embed_tokens.lookup(input_ids)

    def _forward(self, x, caches, adapters, past, heads, neuron_blocks, all_positions=False, skip=()):
        cfg = self.cfg
        new_caches = []
        per_layer = 2 * len(PROJECTIONS)
        rope = past
        if self.shape.fuse_epilogues:
            rope = _te(lambda x, p: prefix.rope_table(x, p, cfg.rope_theta, cfg.head_dim), "rope_table", x, past)
        for i, layer in enumerate(self.model.layers):
            if i in skip:
                new_caches += [caches[2 * i], caches[2 * i + 1]]
                continue
            full = i in self.shape.anchors
            widths = (
                (cfg.num_heads, cfg.intermediate_size) if full else (heads, neuron_blocks * self.shape.neuron_block)
            )
            mine = adapters[i * per_layer : (i + 1) * per_layer]
            lora = {p: (mine[2 * j], mine[2 * j + 1]) for j, p in enumerate(PROJECTIONS)}
            x, kc, vc = self._layer(layer, x, caches[2 * i], caches[2 * i + 1], lora, past, rope, *widths)
            new_caches += [kc, vc]
        if not all_positions:  # only the last position goes through the LM head
            x = _te(lambda x: te.compute((1, x.shape[1]), lambda _, i: x[x.shape[0] - 1, i], name="last"), "last", x)
        h = self._norm(x, self.model.norm)
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        logits = head.logits(h)  # (1 or T, vocab)
        return logits, tuple(new_caches)

    def prefill(self, embeddings, caches, adapters, past, heads, neuron_blocks):
        return self._forward(embeddings, caches, adapters, past, heads, neuron_blocks)

    def decode(self, embeddings, caches, adapters, past, heads, neuron_blocks):
        return self._forward(embeddings, caches, adapters, past, heads, neuron_blocks)

    def score(self, embeddings, caches, adapters, past, heads, neuron_blocks):
        return self._forward(embeddings, caches, adapters, past, heads, neuron_blocks, all_positions=True)

    def _dropped(self, all_positions: bool, skip: tuple[int, ...]):
        """A method like `prefill` (or `score`) with the layers `skip` dropped."""

        def method(embeddings, caches, adapters, past, heads, neuron_blocks):
            return self._forward(embeddings, caches, adapters, past, heads, neuron_blocks, all_positions, skip)

        return method

    def get_default_spec(self):
        cfg = self.cfg
        width = cfg.num_kv_heads * cfg.head_dim
        k_cache = spec.Tensor([width, self.shape.max_len], "float32")  # keys transposed
        v_cache = spec.Tensor([self.shape.max_len, width], "float32")
        d = cfg.hidden_size
        prompt, token = spec.Tensor(["seq_len", d], "float32"), spec.Tensor([1, d], "float32")
        adapter_dtype = quant.scheme(self.shape.quant).adapter_dtype
        args = {  # signature.ARGUMENTS, "embeddings" aside (a prompt or one token)
            "caches": [k_cache, v_cache] * cfg.num_layers,
            # the rank is the call's: 0 (tensors of no rows) runs a level without an adapter at no cost
            "adapters": [
                spec.Tensor(signature.with_rank(shape, RANK), adapter_dtype)
                for shape in adapter_shapes(cfg, self.shape.lora_rank)
            ],
            "past": int,
            "heads": int,
            "neuron_blocks": int,
        }
        mode = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        embeddings = {"prefill": prompt, "decode": token, "score": prompt}

        def declared(method: str) -> dict:
            values = {**args, "embeddings": embeddings[method]}
            return {name: values[name] for name in signature.ARGUMENTS} | mode

        methods = {signature.EMBED: {"input_ids": spec.Tensor(["seq_len"], "int32"), **mode}}
        methods |= {m: declared(m) for m in signature.METHODS}
        for n, skip in self.shape.layer_drops:
            for m in signature.METHODS:
                name = signature.function_name(m, n)
                # nn export looks methods up on the module by name
                object.__setattr__(self, name, self._dropped(m == "score", skip))
                methods[name] = declared(m)
        return nn.spec.ModuleSpec.from_raw(methods, self)


def adapter_names(cfg: ModelConfig) -> list[str]:
    """The adapter inputs in call order: per layer and projection, A then B (stored as B^T strips)."""
    return [f"{n}.lora_{part}" for n in projection_names(cfg) for part in ("A", "B")]


def adapter_shapes(cfg: ModelConfig, rank: int) -> list[tuple[int, ...]]:
    """Shapes of the adapter inputs in call order (`kernel_layout`): A (r, in), B^T (out/strip, r, strip); the rank
    is the second-to-last axis of both (signature.with_rank)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    io = {
        "self_attn.q_proj": (d, cfg.num_heads * hd),
        "self_attn.k_proj": (d, cfg.num_kv_heads * hd),
        "self_attn.v_proj": (d, cfg.num_kv_heads * hd),
        "self_attn.o_proj": (cfg.num_heads * hd, d),
        "mlp.gate_proj": (d, f),
        "mlp.up_proj": (d, f),
        "mlp.down_proj": (f, d),
    }

    def bt(out: int) -> tuple[int, int, int]:
        strip = prefix.strip_width(out)
        return (out // strip, rank, strip)

    return [s for _ in range(cfg.num_layers) for p in PROJECTIONS for s in ((rank, io[p][0]), bt(io[p][1]))]


def export(cfg: ModelConfig, shape: ExportShape) -> tuple[tvm.IRModule, list[str]]:
    """The Relax module and the parameter names in the order the packed `params` argument expects."""
    model = ElasticRelaxModel(cfg, shape)
    with prefix.native_half(shape.native_half):
        mod, named_params = model.export_tvm(spec=model.get_default_spec())
    # upper bounds of the symbolic extents let the memory planner allocate every intermediate once, at its largest
    bounds = {
        "seq_len": shape.max_len,
        "past": shape.max_len,
        "heads": cfg.num_heads,
        "neuron_blocks": cfg.intermediate_size // shape.neuron_block,
        RANK: shape.lora_rank,
    }
    assert set(bounds) == set(signature.SYMBOLIC)
    for name in signature.function_names(n for n, _ in shape.layer_drops):
        mod[name] = mod[name].with_attr("tir_var_upper_bound", bounds)
    return mod, [name for name, _ in named_params]
