"""Build an elastified model for one target: compiled library + weights in TVM's tensor-cache format.

Output folder `dist/<model>/<target>/` (formats/build.py): one library for every level (the kernels take the
active widths as arguments, formats/signature.py), the full-width reordered weights written once, each level's
recovery adapter ("adapter/<fraction>/<projection>.lora_A|B"), the elastify folder's elastic.json and tokenizer,
the TLM built for the same target (when trained) and the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import time
from pathlib import Path

from elastilm import __version__
from elastilm.compile.build_tlm import build_tlm
from elastilm.compile.export import ExportShape, adapter_names, adapter_shapes, export, kernel_layout
from elastilm.compile.quantize import PARTS, quantize
from elastilm.elastic_ops.prefix import ATTENTION_BLOCK
from elastilm.formats import adapters as adapters_file
from elastilm.formats import build as build_file
from elastilm.formats import elastic, layer_drop, quant
from elastilm.formats import tlm as tlm_file
from elastilm.formats.config import PROJECTIONS
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.quant import Scheme
from elastilm.targets import preset


def export_shape(
    model: elastic.ElasticModel,
    max_len: int,
    lora_rank: int,
    drops: dict[int, tuple[int, ...]] | None = None,
    scheme: Scheme = quant.SCHEMES["q0f32"],
    fuse_epilogues: bool = True,
    native_half: bool = False,
) -> ExportShape:
    cfg = model.config
    block = math.gcd(model.meta.get("neuron_multiple", 1), cfg.intermediate_size)
    # every active input width of a quantized projection is a whole number of groups
    scheme.check_width(cfg.hidden_size, "the hidden size", "this model cannot use this scheme")
    scheme.check_width(cfg.head_dim, "the head dim (o_proj reads whole heads)", "this model cannot use this scheme")
    scheme.check_width(
        block,
        "the neuron block (down_proj reads whole blocks)",
        f"re-run `elastilm elastify --neuron-multiple {max(scheme.group, 64)}`",
    )
    return ExportShape(
        anchors=tuple(model.anchors),
        # a divisor of the FFN size, so the full width is a whole number of blocks too
        neuron_block=block,
        max_len=max_len,
        biases=frozenset(b for b in PROJECTIONS if f"model.layers.0.{b}.bias" in model.params),
        lora_rank=lora_rank,
        layer_drops=tuple(sorted((drops or {}).items())),
        quant=scheme.name,
        fuse_epilogues=fuse_epilogues,
        native_half=native_half,
    )


def library_tensors(names: list[str], params: dict, scheme: Scheme):
    """(name, array) of every parameter the library takes, in the layout its kernels read: fp32 strips
    (`kernel_layout`), or a linear weight quantized once, in its format, into its `q_weight`, `q_scale` (and
    `q_min`) (compile/quantize.py); adapter entries in the scheme's `adapter_dtype`."""
    import numpy as np

    from elastilm.compile.quantize import stored_adapter

    packed: dict[str, tuple] = {}
    for name in names:
        base, _, part = name.rpartition(".")
        if part in PARTS:
            if base not in packed:
                packed[base] = quantize(params[base + ".weight"].numpy(), scheme.format(base))
            yield name, packed[base][PARTS.index(part)]
        else:
            array = np.ascontiguousarray(kernel_layout(name, params[name]).numpy())
            yield name, stored_adapter(array, scheme, name) if name.endswith((".lora_A", ".lora_B")) else array


def _adapters_base(folder: Path, scheme: Scheme) -> str:
    """The scheme the folder's adapters were trained against (`elastilm recover --quant`); refused when it is a
    quantized one other than the build's, whose error they would correct in the wrong weights. Adapters trained
    against fp32 serve any scheme (plain LoRA on a quantized base)."""
    base = adapters_file.trained_on(folder)
    if quant.scheme(base).quantized and base != scheme.name:
        raise ElastiLMError(
            f"{folder}: its adapters were trained against {base} weights and this build is {scheme.name}; compile "
            f"with --quant {base}, or re-run `elastilm recover {folder} --quant {scheme.name}`"
        )
    return base


def _host_triple(target) -> str:
    """The triple of the CPU that runs the library's host code."""
    host = target.host if target.host is not None else target
    return str(host.attrs.get("mtriple", ""))


def _system_lib_prefix(model_name: str) -> str:
    """The symbol prefix of a system library: the model name as a C identifier, e.g. smollm2_135m_."""
    return "".join(c if c.isalnum() else "_" for c in model_name) + "_"


def check_kernels(executable, required: bool | None) -> str | None:
    """Compile the library's OpenCL kernels on PoCL; returns the checker's name, or None when not checked.
    required=None checks when PoCL is installed, True insists, False skips."""
    from elastilm.elastic_ops import pocl

    source = pocl.opencl_source(executable.mod)
    if not source or required is False or (required is None and not pocl.available()):
        return None
    pocl.compile_source(source)
    return "pocl"


def build(
    folder: Path,
    target: str = "host-cpu",
    out: Path | None = None,
    max_len: int = 2048,
    kernel_check: bool | None = None,
    quantization: str = "q0f32",
) -> Path:
    """Compile `folder` (an elastify output) for `target` with the linear weights in `quantization`
    (formats/quant.py); returns the build folder. `kernel_check`: see check_kernels (OpenCL targets only)."""
    import tvm
    from tvm.contrib.tvmjs import dump_tensor_cache

    if max_len < 1:
        raise ElastiLMError(f"max_len must be positive, got {max_len}")
    scheme = quant.scheme(quantization)
    spec = preset(target)
    spec.check_buildable()
    folder = Path(folder)
    model = elastic.load(folder, with_tokenizer=False)
    out = Path(out) if out is not None else folder / target
    out.mkdir(parents=True, exist_ok=True)
    # the attention kernel reads keys in whole blocks, so the cache holds a whole number of them
    max_len = min(max_len, model.config.max_position_embeddings)
    adapters = adapters_file.load(folder)  # {} before `elastilm recover`: the model runs with zero adapters
    rank = adapters_file.rank(adapters)
    adapters_base = _adapters_base(folder, scheme) if adapters else None
    drops = layer_drop.read_variants(folder, model.config.num_layers)  # {} before `elastilm layer-drop`
    # CPU schedules fuse the adapter and the rotation into the projection kernels; dlight (GPUs) wants one reduction each
    cpu = spec.device == "cpu"
    window = -(-max_len // ATTENTION_BLOCK) * ATTENTION_BLOCK
    shape = export_shape(model, window, rank, drops, scheme, cpu, spec.native_half())

    t = time.perf_counter()
    mod, names = export(model.config, shape)
    prefix = _system_lib_prefix(model.name) if spec.system_lib else None
    if prefix is not None:
        mod = mod.with_attr("system_lib_prefix", prefix)
    executable = tvm.compile(mod, target=spec.tvm_target(), relax_pipeline=spec.relax_pipeline())
    compile_seconds = time.perf_counter() - t
    kernels_checked = check_kernels(executable, kernel_check)
    library = f"model.{spec.output}"
    spec.export_library(executable, out / library)

    params_dir = out / "params"
    shutil.rmtree(params_dir, ignore_errors=True)
    adapter_tensors = {
        build_file.adapter_tensor(f, f"{name}.lora_{part}"): pair[0 if part == "A" else 1]
        for f, ad in sorted(adapters.items())
        for name, pair in ad.items()
        for part in ("A", "B")
    }
    with contextlib.redirect_stdout(io.StringIO()):  # it prints where it writes; our summary says so
        dump_tensor_cache(
            library_tensors(names + list(adapter_tensors), {**model.params, **adapter_tensors}, scheme),
            str(params_dir),
            encode_format="raw",
            show_progress=False,
        )
    for f in elastic.read(folder)["files"]:
        if f not in (elastic.WEIGHTS, elastic.IMPORTANCE):
            shutil.copy2(folder / f, out / f)  # tokenizer files
    shutil.copy2(folder / elastic.FILE, out / elastic.FILE)
    tlm_dir = build_tlm(folder, spec, out)  # None before `elastilm train-tlm`
    if tlm_dir is None:
        shutil.rmtree(out / tlm_file.FOLDER, ignore_errors=True)

    build_file.write_manifest(
        out,
        {
            "elastilm_version": __version__,
            "tvm_version": tvm.__version__,
            "model": model.name,
            "target": {
                "name": spec.name,
                "tvm": str(spec.tvm_target()),
                "mtriple": _host_triple(spec.tvm_target()),
                "output": spec.output,
                "device": spec.device,
            },
            "kernels_checked": kernels_checked,
            "levels_sha256": hashlib.sha256(json.dumps(model.levels.to_dicts(), sort_keys=True).encode()).hexdigest(),
            "system_lib_prefix": prefix,
            "library": library,
            "context_window": max_len,
            "cache_rows": shape.max_len,
            "neuron_block": shape.neuron_block,
            "param_names": names,
            "adapter_levels": sorted(adapters),
            "adapter_names": adapter_names(model.config),  # in call order; each level's are "adapter/<fraction>/<name>"
            "adapter_shapes": adapter_shapes(model.config, rank),
            "adapter_dtype": scheme.adapter_dtype,  # uint16: fp16 bits (elastic_ops.prefix.as_f32)
            # the rank of the all-zero set that levels without an adapter pass (the rank is a runtime extent):
            # none on CPUs; one row on GPUs, as OpenCL cannot allocate an empty buffer
            "no_adapter_rank": 0 if cpu else 1,
            "param_layout": (
                "linear weights and the embedding table quantized in strips (compile/quantize.py); norms as in the "
                "checkpoint"
                if scheme.quantized
                else "linear weights (out/64, in, 64) strips; embeddings and norms as in the checkpoint"
            ),
            # the weights' scheme and each kind's format (formats/quant.py); quantized: q_weight/q_scale(/q_min)
            # strips (compile/quantize.py)
            "quantization": scheme.describe(),
            "adapters_trained_on": adapters_base,  # the students' base weights in `elastilm recover` (None: none)
            "compile_seconds": round(compile_seconds, 2),
            # the layer-dropping baseline: {layers dropped: which}, run by the functions <method>_drop<n>
            "layer_drop": {str(n): list(layers) for n, layers in sorted(drops.items())},
            "tlm": tlm_file.FOLDER if tlm_dir else None,  # its own manifest inside; its files are listed here too
        },
    )
    return out
