"""A build folder on disk (`elastilm compile`): `manifest.json` beside the library and its weights.

model.so | model.tar   one library for every level (formats/signature.py: its functions and arguments)
params/                the weights in TVM's tensor-cache format, and each level's adapter "adapter/<fraction>/..."
elastic.json, tokenizer copied from the elastify folder, so the runtime needs nothing else
tlm/                   the TLM built for the same target (formats/tlm.py), when trained
latency.json           added later by `elastilm profile` (formats/latency.py); not listed in the manifest
manifest.json          target, TVM version, parameter order, adapters, sha256 of every other file
"""

from __future__ import annotations

import platform
from pathlib import Path

from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import read_json, sha256, tree, verify_files, write_json

MANIFEST = "manifest.json"
SCHEMA, VERSION = "elastilm.build", 3  # 2: adapter inputs; 3: B^T of the adapters in strips


def adapter_tensor(fraction: float, name: str) -> str:
    """The tensor-cache name of level `fraction`'s adapter input `name` (one of manifest "adapter_names")."""
    return f"adapter/{fraction:g}/{name}"


def build_id(folder: Path) -> str:
    """A short id of one build's exact contents (its manifest lists every file's sha256): rows a resumable job
    writes carry it, so that rows of an older or another build are never reused."""
    return sha256(Path(folder) / MANIFEST)[:16]


def write_manifest(out: Path, fields: dict) -> Path:
    """`fields` plus the sha256 of every file but the manifests (this one, the TLM's) and the latency profiles
    measured later."""
    files = tree(out, lambda rel: rel.name == MANIFEST or (len(rel.parts) == 1 and rel.name.startswith("latency")))
    return write_json(Path(out) / MANIFEST, {"schema": SCHEMA, "schema_version": VERSION, **fields, "files": files})


def read_manifest(folder: Path, verify: bool = True, runs: str | None = "here") -> dict:
    """manifest.json of a build folder, after checking schema, TVM version and every file's sha256, and that
    the library can run `here` (in this process) or "rpc" (loaded by a device); runs=None skips that check."""
    import tvm

    doc = read_json(Path(folder) / MANIFEST, SCHEMA, VERSION, f"build it with `elastilm compile` (into {folder})")
    target = doc["target"]
    if runs == "rpc" and target["output"] != "so":
        raise ElastiLMError(
            f"{folder}: target '{target['name']}' is a static library (.{target['output']}) to link into an app; "
            "RPC loads shared libraries: use a .so preset such as linux-arm64-cpu or host-cpu"
        )
    if runs == "here" and (target["output"] != "so" or target["mtriple"].split("-")[0] != platform.machine()):
        raise ElastiLMError(
            f"{folder}: built for target '{target['name']}' ({target['mtriple']}, .{target['output']}), which this "
            f"{platform.machine()} machine cannot load; build with --target host-cpu to run it here"
        )
    device = target.get("device", "cpu")
    if runs == "here" and device != "cpu" and not tvm.runtime.enabled(device):
        name = device.replace("opencl", "OpenCL")
        raise ElastiLMError(
            f"{folder}: built for target '{target['name']}', whose kernels run on {name}, but this TVM has no {name} "
            "runtime (the PyPI wheel ships none); run it on a device over RPC, or build with --target host-cpu"
        )
    if doc["tvm_version"] != tvm.__version__:
        raise ElastiLMError(
            f"{folder}: built with TVM {doc['tvm_version']}, this runtime has TVM {tvm.__version__}; rebuild it"
        )
    if verify:
        verify_files(folder, doc["files"], MANIFEST)
    return doc
