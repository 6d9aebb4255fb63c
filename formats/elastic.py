"""The elastified model on disk (`elastilm elastify`): `elastic.json` beside reordered weights.

Folder layout:
  elastic.json            schema version, model config, anchors, level table, calibration, sha256 of each file
  model.safetensors       reordered full-width fp32 weights (Hugging Face names; interleaved KV map)
  importance.safetensors  unit and layer scores and the permutation (new -> old), for provenance
  tokenizer files         as written by the tokenizer's save_pretrained

`read` gives the document alone (no torch: the runtime reads the copy in every build folder); `load` the model
with its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from elastilm.formats.config import ModelConfig
from elastilm.formats.files import checksums, read_json, verify_files, write_json
from elastilm.formats.widths import LevelTable, layer_widths

if TYPE_CHECKING:
    import torch

FILE = "elastic.json"
SCHEMA, VERSION = "elastilm.elastic", 1
WEIGHTS = "model.safetensors"
IMPORTANCE = "importance.safetensors"
_KNOWN = {"schema", "schema_version", "elastilm_version", "name", "config", "anchor_layers", "levels", "files"}


@dataclass
class ElasticModel:
    name: str
    config: ModelConfig
    anchors: list[int]
    levels: LevelTable
    params: dict[str, torch.Tensor]
    tokenizer: object = None
    meta: dict = field(default_factory=dict)  # calibration, source, neuron_multiple, ... (elastic.json's other keys)

    def widths(self, fraction: float) -> list[tuple[int, int]]:
        """Per-layer (heads, neurons) at level `fraction`: anchors full, the rest at the level's width."""
        return layer_widths(self.config, self.anchors, self.levels[fraction])


def save(out: Path, model: ElasticModel, importance: dict[str, torch.Tensor]) -> Path:
    """Write the folder; returns the path of elastic.json."""
    from safetensors.torch import save_file

    from elastilm import __version__

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.params.items()}, out / WEIGHTS, metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in importance.items()}, out / IMPORTANCE)
    files = [WEIGHTS, IMPORTANCE]
    if model.tokenizer is not None:
        files += [Path(p).name for p in model.tokenizer.save_pretrained(out) if Path(p).is_file()]
    doc = {
        "schema": SCHEMA,
        "schema_version": VERSION,
        "elastilm_version": __version__,
        "name": model.name,
        "config": model.config.to_dict(),
        "anchor_layers": model.anchors,
        "levels": model.levels.to_dicts(),
        **model.meta,
        "files": checksums(out, set(files)),
    }
    return write_json(out / FILE, doc)


def read(folder: Path) -> dict:
    """elastic.json of an elastify or build folder, after the schema check."""
    return read_json(Path(folder) / FILE, SCHEMA, VERSION, f"run `elastilm elastify --out {folder}`")


def levels(doc: dict) -> LevelTable:
    return LevelTable.from_dicts(doc["levels"])


def load(folder: Path, with_tokenizer: bool = True) -> ElasticModel:
    """Read an elastified model, after checking every file's sha256."""
    from safetensors.torch import load_file

    folder = Path(folder)
    doc = read(folder)
    verify_files(folder, doc["files"], FILE)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return ElasticModel(
        name=doc["name"],
        config=ModelConfig.from_dict(doc["config"]),
        anchors=list(doc["anchor_layers"]),
        levels=levels(doc),
        params=load_file(folder / WEIGHTS),
        tokenizer=tokenizer,
        meta={k: v for k, v in doc.items() if k not in _KNOWN},
    )
