"""Build the TLM for a target with TVM, beside the LLM: <build>/tlm/ (library, weights, tokenizer, manifest).

The torch model goes through torch.export and TVM's Relax frontend (`from_exported_program`) twice, for the
two static window lengths (`score` and `decide`, one library, one set of weights); its weights stay inputs (a tensor cache, as for the LLM) rather than constants in the
library. Linear layers are exported with their weights stored transposed ([in, out]), so the matmul kernels
read the output axis contiguously and no transpose runs per call. CPU presets use `schedule_cpu.schedule_dense`,
GPU presets the same dlight pipeline as the LLM.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np

from elastilm.compile import tlm as tlm_model
from elastilm.runtime.files import sha256
from elastilm.runtime.tlm import MANIFEST, MANIFEST_SCHEMA, MANIFEST_VERSION, META, TOKENIZER


def _transposed_linears(model):
    """A copy of `model` whose nn.Linear layers hold W^T, computing x @ W^T + b (the same function)."""
    import torch
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

    if not (Path(folder) / tlm_model.FOLDER / META).is_file():
        return None
    model, meta = tlm_model.load(folder)
    out = Path(out) / tlm_model.FOLDER
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
        dump_tensor_cache(((n, np.ascontiguousarray(w)) for n, w in zip(names, weights)), str(out / "params"),
                          encode_format="raw", show_progress=False)
    shutil.copy2(Path(folder) / tlm_model.FOLDER / TOKENIZER, out / TOKENIZER)
    (out / META).write_text(json.dumps({k: v for k, v in meta.items() if k != "training"}, indent=2) + "\n")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "schema_version": MANIFEST_VERSION,
        "tvm_version": tvm.__version__,
        "target": spec.name,
        "library": library,
        "param_names": names,
        "trained_sha256": meta["sha256"],
        "compile_seconds": round(seconds, 2),
        "files": {f: sha256(out / f) for f in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
