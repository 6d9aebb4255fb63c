"""The elastified model on disk: `elastic.json` beside reordered weights. One writer (`save`), one reader (`load`).

Folder layout:
  elastic.json            schema version, model config, anchors, level table, calibration, sha256 of each file
  model.safetensors       reordered full-width fp32 weights (Hugging Face names; interleaved KV map)
  importance.safetensors  unit and layer scores and the permutation (new -> old), for provenance
  tokenizer files         as written by the tokenizer's save_pretrained
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elastilm import ElastiLMError, __version__
from elastilm.compile.config import ModelConfig
from elastilm.compile.levels import Level, layer_widths
from elastilm.runtime.files import sha256, verify_files

SCHEMA = "elastilm.elastic"
SCHEMA_VERSION = 1
WEIGHTS = "model.safetensors"
IMPORTANCE = "importance.safetensors"


@dataclass
class ElasticModel:
    name: str
    config: ModelConfig
    anchors: list[int]
    levels: list[Level]
    params: dict[str, torch.Tensor]
    tokenizer: object = None
    meta: dict = field(default_factory=dict)

    def level(self, fraction: float) -> Level:
        for lv in self.levels:
            if abs(lv.fraction - fraction) < 1e-9:
                return lv
        valid = ", ".join(f"{lv.fraction:g}" for lv in self.levels)
        raise ElastiLMError(f"unknown level {fraction:g}; valid levels are {valid}")

    def widths(self, fraction: float) -> list[tuple[int, int]]:
        return layer_widths(self.config, self.anchors, self.level(fraction))


def save(out: Path, model: ElasticModel, importance: dict[str, torch.Tensor]) -> Path:
    """Write the folder; returns the path of elastic.json."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.params.items()}, out / WEIGHTS, metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in importance.items()}, out / IMPORTANCE)
    files = [WEIGHTS, IMPORTANCE]
    if model.tokenizer is not None:
        files += [Path(p).name for p in model.tokenizer.save_pretrained(out) if Path(p).is_file()]
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "elastilm_version": __version__,
        "name": model.name,
        "config": model.config.to_dict(),
        "anchor_layers": model.anchors,
        "levels": [lv.to_dict() for lv in model.levels],
        **model.meta,
        "files": {f: sha256(out / f) for f in sorted(set(files))},
    }
    path = out / "elastic.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "elastic.json"
    if not path.is_file():
        raise ElastiLMError(f"{folder}: no elastic.json; run `elastilm elastify --out {folder}` first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ElastiLMError(f"{path}: not valid JSON ({e})") from None
    if doc.get("schema") != SCHEMA or doc.get("schema_version") != SCHEMA_VERSION:
        raise ElastiLMError(
            f"{path}: schema {doc.get('schema')} v{doc.get('schema_version')}, this elastilm reads {SCHEMA} "
            f"v{SCHEMA_VERSION}; re-run `elastilm elastify`"
        )
    return doc


def load(folder: Path, with_tokenizer: bool = True) -> ElasticModel:
    """Read an elastified model, after checking every file's sha256."""
    folder = Path(folder)
    doc = read_manifest(folder)
    verify_files(folder, doc["files"], "elastic.json")
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    known = {"schema", "schema_version", "elastilm_version", "name", "config", "anchor_layers", "levels", "files"}
    return ElasticModel(
        name=doc["name"],
        config=ModelConfig.from_dict(doc["config"]),
        anchors=list(doc["anchor_layers"]),
        levels=[Level(**lv) for lv in doc["levels"]],
        params=load_file(folder / WEIGHTS),
        tokenizer=tokenizer,
        meta={k: v for k, v in doc.items() if k not in known},
    )
