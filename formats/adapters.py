"""Recovery adapters on disk (`elastilm recover`): `adapters.safetensors` beside `recover.json`, in the elastify
folder.

adapters.safetensors  "<fraction>/<projection>.lora_A" (r, in) and ".lora_B" (out, r), the LoRA scale alpha/r
                      folded into B; projections are e.g. "model.layers.3.mlp.up_proj"
recover.json          schema, version, the training options, losses and time, and the sha256 of the tensors

In memory: {fraction: {projection: (A, B)}}. Level 1.0 (the distillation teacher) has none.
"""

from __future__ import annotations

from pathlib import Path

from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import read_json, sha256, write_json

TENSORS = "adapters.safetensors"
SUMMARY = "recover.json"
SCHEMA, VERSION = "elastilm.recover", 1
DEFAULT_RANK = 8  # the paper's LoRA rank


def key(fraction: float, projection: str, part: str) -> str:
    return f"{fraction:g}/{projection}.lora_{part}"


def rank(adapters: dict) -> int:
    """The LoRA rank of `adapters`, or the default rank if there are none."""
    for level in adapters.values():
        for a, _ in level.values():
            return a.shape[0]
    return DEFAULT_RANK


def read_summary(folder: Path) -> dict | None:
    """recover.json after the schema check, or None before `elastilm recover`."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return None
    return read_json(path, SCHEMA, VERSION, f"re-run `elastilm recover {folder}`")


def trained_on(folder: Path) -> str:
    """The weight scheme the folder's adapters were trained against (`elastilm recover --quant`; fp32 before
    that option existed or before recovery)."""
    return (read_summary(folder) or {}).get("options", {}).get("quant", "q0f32")


def load(folder: Path) -> dict:
    """{fraction: {projection: (A, B scaled)}} after checking the tensors' sha256 against recover.json; empty if
    recovery has not run."""
    from safetensors.torch import load_file

    path = Path(folder) / TENSORS
    if not path.is_file():
        return {}
    summary = read_summary(folder)
    if summary is None or summary.get("sha256") != sha256(path):
        raise ElastiLMError(
            f"{path}: checksum does not match {SUMMARY} (changed or partly written); re-run `elastilm recover`"
        )
    tensors = load_file(path)
    out: dict[float, dict] = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A"):
            fraction, projection = name[: -len(".lora_A")].split("/", 1)
            out.setdefault(float(fraction), {})[projection] = (a, tensors[name[: -len("A")] + "B"])
    return out


def save(folder: Path, adapters: dict, summary: dict) -> None:
    """Write {fraction: {projection: (A, B scaled)}} and `summary` (which gets the schema and the tensors' sha256)."""
    from safetensors.torch import save_file

    tensors = {}
    for f, level in adapters.items():
        for projection, (a, b) in level.items():
            tensors[key(f, projection, "A")] = a.contiguous()
            tensors[key(f, projection, "B")] = b.contiguous()
    save_file(tensors, Path(folder) / TENSORS)
    doc = {"schema": SCHEMA, "schema_version": VERSION, **summary, "sha256": sha256(Path(folder) / TENSORS)}
    write_json(Path(folder) / SUMMARY, doc)
