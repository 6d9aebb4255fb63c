"""The layer-dropping baseline's choices on disk (`elastilm layer-drop`): `layer_drop.json` in the elastify folder.

block_influence  per layer, 1 - mean cos(layer input, layer output) on the calibration windows
order            layers in the order they are dropped
variants         {layers dropped: the dropped layers}, one per elastic level below 1.0
"""

from __future__ import annotations

from pathlib import Path

from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import read_json, write_json

FILE = "layer_drop.json"
SCHEMA, VERSION = "elastilm.layer-drop", 1


def write(folder: Path, doc: dict) -> dict:
    """Write `doc` (scores, order, variants) as layer_drop.json; returns it as written."""
    doc = {"schema": SCHEMA, "schema_version": VERSION, **doc}
    write_json(Path(folder) / FILE, doc)
    return doc


def read_variants(folder: Path, num_layers: int) -> dict[int, tuple[int, ...]]:
    """{layers dropped: the dropped layers} from an elastify folder ({} before `elastilm layer-drop`)."""
    path = Path(folder) / FILE
    if not path.is_file():
        return {}
    doc = read_json(path, SCHEMA, VERSION, f"re-run `elastilm layer-drop {folder}`")
    variants = {int(n): tuple(layers) for n, layers in doc["variants"].items()}
    for n, layers in variants.items():
        if len(set(layers)) != n or not all(0 <= i < num_layers for i in layers):
            raise ElastiLMError(f"{path}: variant {n} drops {list(layers)}, not {n} distinct layers of {num_layers}")
    return variants
