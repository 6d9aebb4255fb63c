"""A latency profile on disk (`elastilm profile`): `latency.json` in the build folder (or where --out says).

prompt_lengths  the profiled prompt lengths (tokens)
levels          per level: {"fraction", "ttft_ms": one per prompt length, "tpot_ms": one per prompt length (the
                median time of a decoded token right after a prompt of that length: decode attention reads the
                whole KV cache, so a token costs more the longer the context)}
layer_drop      per layer-drop variant: {"fraction": share of layers kept, "dropped", "layers", "ttft_ms", "tpot_ms"}
model, target, device, measured_at, decode_tokens, repeat
"""

from __future__ import annotations

from pathlib import Path

from elastilm.formats.files import check_schema, read_json, write_json

FILE = "latency.json"
SCHEMA, VERSION = "elastilm.latency", 2  # 2: TPOT per prompt length


def write(folder: Path, doc: dict) -> Path:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_json(Path(folder) / FILE, {"schema": SCHEMA, "schema_version": VERSION, **doc})


def check(doc: dict, where: str = "latency profile") -> dict:
    return check_schema(doc, where, SCHEMA, VERSION, "measure one with `elastilm profile`")


def read(path: Path) -> dict:
    """The profile at `path` (a latency.json file)."""
    path = Path(path)
    return read_json(path, SCHEMA, VERSION, f"measure one with `elastilm profile --build {path.parent}`")
