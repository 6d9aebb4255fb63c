"""An app bundle on disk (`elastilm package`): the folder an app ships as assets.

<model>-<target>/          a build folder (formats/build.py), latency.json and tlm/ included when present
elastilm-app-config.json   the models: library, system-library prefix, context window, levels, adapters, TLM
manifest.json              TVM version and the sha256 of every file above; checked before anything loads
"""

from __future__ import annotations

import json
from pathlib import Path

from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import check_schema, read_json, tree, verify_files, write_json

APP_CONFIG = "elastilm-app-config.json"
MANIFEST = "manifest.json"
SCHEMA, VERSION = "elastilm.bundle", 1
APP_SCHEMA, APP_VERSION = "elastilm.app", 1


def write(folder: Path, models: list[dict]) -> None:
    """The app config listing `models` and the manifest over every file already in `folder`."""
    import tvm

    from elastilm import __version__

    folder = Path(folder)
    write_json(folder / APP_CONFIG, {"schema": APP_SCHEMA, "schema_version": APP_VERSION, "models": models})
    write_json(
        folder / MANIFEST,
        {
            "schema": SCHEMA,
            "schema_version": VERSION,
            "elastilm_version": __version__,
            "tvm_version": tvm.__version__,
            "files": tree(folder, lambda rel: str(rel) == MANIFEST),
        },
    )


def read(bundle: Path) -> dict:
    """The app config, after checking the bundle's schema, TVM version and the sha256 of every file."""
    import tvm

    bundle = Path(bundle)
    if not (bundle / MANIFEST).is_file():
        raise ElastiLMError(f"{bundle}: not a bundle (no {MANIFEST}); make one with `elastilm package`")
    doc = read_json(bundle / MANIFEST, SCHEMA, VERSION, "package it again with `elastilm package`")
    if doc["tvm_version"] != tvm.__version__:
        raise ElastiLMError(f"{bundle}: packaged with TVM {doc['tvm_version']}, this runtime has TVM {tvm.__version__}")
    verify_files(bundle, doc["files"], MANIFEST)
    return check_schema(
        json.loads((bundle / APP_CONFIG).read_text()),
        bundle / APP_CONFIG,
        APP_SCHEMA,
        APP_VERSION,
        "package it again with `elastilm package`",
    )


def model_folder(bundle: Path, model_id: str | None = None) -> Path:
    """The build folder of one model of a verified bundle: the only one, or `model_id`."""
    ids = [m["model_id"] for m in read(bundle)["models"]]
    if model_id is None and len(ids) == 1:
        model_id = ids[0]
    if model_id not in ids:
        raise ElastiLMError(f"{bundle}: pick a model with --model; the bundle has {', '.join(ids)}")
    return Path(bundle) / model_id
