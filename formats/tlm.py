"""The TLM on disk: trained (`elastilm train-tlm`, <elastify folder>/tlm/) and built (`elastilm compile`,
<build>/tlm/).

Trained:  tlm.safetensors (the torch state dict), tlm.json (shape, prompt ratios, levels, training record,
          sha256 of the weights), tokenizer.json (the backbone's BERT tokenizer)
Built:    tlm.<so|tar> (functions `score` and `decide`), params/ (tensor cache, names "w0".."wN" in call order),
          tlm.json (as trained, without the training record), tokenizer.json, manifest.json (sha256 of each file)
"""

from __future__ import annotations

from pathlib import Path

from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import read_json, sha256, tree, verify_files, write_json

FOLDER = "tlm"
WEIGHTS = "tlm.safetensors"
META = "tlm.json"
TOKENIZER = "tokenizer.json"
MANIFEST = "manifest.json"
META_SCHEMA, META_VERSION = "elastilm.tlm", 1
BUILD_SCHEMA, BUILD_VERSION = "elastilm.tlm-build", 1


def save(folder: Path, state: dict, meta: dict) -> Path:
    """Write the trained TLM's weights and tlm.json into `folder`/tlm/ (the tokenizer is copied by the caller);
    returns that folder."""
    from safetensors.torch import save_file

    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    write_meta(out, {**meta, "sha256": sha256(out / WEIGHTS)})
    return out


def load(folder: Path) -> tuple[dict, dict]:
    """(state dict, tlm.json) of the TLM trained in `folder`/tlm/, after checking the weights' sha256."""
    from safetensors.torch import load_file

    out = Path(folder) / FOLDER
    if not (out / META).is_file():
        raise ElastiLMError(f"{folder}: no trained TLM ({FOLDER}/{META} missing); run `elastilm train-tlm {folder}`")
    meta = read_meta(out)
    if sha256(out / WEIGHTS) != meta["sha256"]:
        raise ElastiLMError(f"{out / WEIGHTS}: checksum differs from {META}; retrain with `elastilm train-tlm`")
    return load_file(str(out / WEIGHTS)), meta


def trained(folder: Path) -> bool:
    return (Path(folder) / FOLDER / META).is_file()


def write_meta(out: Path, meta: dict) -> Path:
    return write_json(Path(out) / META, {"schema": META_SCHEMA, "schema_version": META_VERSION, **meta})


def read_meta(out: Path) -> dict:
    """tlm.json of a trained or built TLM folder."""
    return read_json(Path(out) / META, META_SCHEMA, META_VERSION, "retrain with `elastilm train-tlm` and rebuild")


def write_manifest(out: Path, fields: dict) -> Path:
    """The built TLM's manifest.json: `fields` plus the sha256 of every other file in `out`."""
    files = tree(out, lambda rel: rel.name == MANIFEST)
    doc = {"schema": BUILD_SCHEMA, "schema_version": BUILD_VERSION, **fields, "files": files}
    return write_json(Path(out) / MANIFEST, doc)


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """manifest.json of a built TLM after the schema check and, with `verify`, every file's sha256."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ElastiLMError(
            f"{folder}: no compiled TLM ({MANIFEST} missing); train it with `elastilm train-tlm` and rebuild"
        )
    doc = read_json(path, BUILD_SCHEMA, BUILD_VERSION, "rebuild with `elastilm compile`")
    if verify:
        verify_files(folder, doc["files"], MANIFEST)
    return doc
