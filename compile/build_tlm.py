"""Build the TLM for a target with TVM, beside the LLM: <build>/tlm/ (library, weights, tokenizer, manifest).

The torch model goes through torch.export and TVM's Relax frontend (`from_exported_program`) twice, for the
two static window lengths (`score` and `decide`, one library, one set of weights); its weights stay inputs (a
tensor cache, as for the LLM) rather than constants in the library. Linear layers are exported with their
weights stored transposed ([in, out]), so the matmul kernels read the output axis contiguously and no transpose
runs per call. CPU presets use `schedule_cpu.schedule_dense`,
GPU presets the same dlight pipeline as the LLM.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import time
from pathlib import Path

import numpy as np

from elastilm.compile import tlm_model
from elastilm.formats import tlm as tlm_file


def _transposed_linears(model):
    """A copy of `model` whose nn.Linear layers hold W^T, computing x @ W^T + b (the same function)."""
    from torch import nn

    class Linear(nn.Module):
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous())
            self.bias = linear.bias

        def forward(self, x):
            y = x @ self.weight_t
            return y + self.bias if self.bias is not None else y

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Linear(child))
            else:
                swap(child)

    out = copy.deepcopy(model).eval()
    swap(out)
    return out


def export(model, meta: dict):
    """(Relax module with `score` and `decide`, each (ids, mask, slo, *weights) for its window length, weights
    as numpy arrays in call order, the same for both)."""
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    model = _transposed_linears(model)
    functions, weights = {}, None
    for name, window in (("score", meta["window"]), ("decide", meta["decide_window"])):
        inputs = tuple(torch.from_numpy(a) for a in tlm_model.export_inputs(window))
        with torch.no_grad():
            program = torch.export.export(model, inputs)
        mod, params = relax.frontend.detach_params(from_exported_program(program, keep_params_as_input=True))
        functions[name] = mod["main"].with_attr("global_symbol", name)
        weights = [p.numpy() for p in params["main"]]
    return tvm.IRModule({tvm.ir.GlobalVar(n): f for n, f in functions.items()}), weights


def build_tlm(folder: Path, spec, out: Path) -> Path | None:
    """Compile the trained TLM of elastify folder `folder` for target preset `spec` into `out`/tlm; None if
    the folder has no TLM yet."""
    import tvm
    from tvm.contrib.tvmjs import dump_tensor_cache

    if not tlm_file.trained(folder):
        return None
    model, meta = tlm_model.load(folder)
    out = Path(out) / tlm_file.FOLDER
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    mod, weights = export(model, meta)
    executable = tvm.compile(mod, target=spec.tvm_target(), relax_pipeline=spec.relax_pipeline(dense=True))
    seconds = time.perf_counter() - t
    library = f"tlm.{spec.output}"
    spec.export_library(executable, out / library)
    names = [f"w{i}" for i in range(len(weights))]
    with contextlib.redirect_stdout(io.StringIO()):
        dump_tensor_cache(
            ((n, np.ascontiguousarray(w)) for n, w in zip(names, weights)),
            str(out / "params"),
            encode_format="raw",
            show_progress=False,
        )
    shutil.copy2(Path(folder) / tlm_file.FOLDER / tlm_file.TOKENIZER, out / tlm_file.TOKENIZER)
    tlm_file.write_meta(out, {k: v for k, v in meta.items() if k not in ("training", "schema", "schema_version")})
    tlm_file.write_manifest(
        out,
        {
            "tvm_version": tvm.__version__,
            "target": spec.name,
            "library": library,
            "param_names": names,
            "trained_sha256": meta["sha256"],
            "compile_seconds": round(seconds, 2),
        },
    )
    return out
