"""App bundles: one folder an app ships as assets, with every build it needs and an app config that lists them.

dist/<bundle>/
  <model>-<target>/        a build folder (library, params/ with the weights and each level's recovery adapter,
                           tokenizer, elastic.json, manifest.json, latency.json when profiled, and tlm/: the
                           TLM built for the same target, when trained)
  elastilm-app-config.json the models, their libraries and system-library prefixes, context windows, levels
  manifest.json            TVM version and the sha256 of every file above; checked before anything loads
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tvm

from elastilm import ElastiLMError, __version__
from elastilm.runtime.engine import ElasticEngine, read_build_manifest
from elastilm.runtime.files import sha256, verify_files

APP_CONFIG = "elastilm-app-config.json"
MANIFEST = "manifest.json"
SCHEMA, VERSION = "elastilm.bundle", 1


def package(builds: list[Path], out: Path) -> Path:
    """Copy verified build folders into a bundle at `out` and write its app config and manifest."""
    out = Path(out)
    entries, seen = [], set()
    staged = out.with_name(out.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    for build in map(Path, builds):
        manifest = read_build_manifest(build, runs=None)  # any target: the app loads it, not this machine
        model_id = f"{manifest['model']}-{manifest['target']['name']}"
        if model_id in seen:
            raise ElastiLMError(f"two builds of {model_id} in one bundle")
        seen.add(model_id)
        shutil.copytree(build, staged / model_id, ignore=shutil.ignore_patterns("*.png"))
        elastic = json.loads((build / "elastic.json").read_text())
        entries.append({
            "model_id": model_id,
            "model": manifest["model"],
            "target": manifest["target"]["name"],
            "library": f"{model_id}/{manifest['library']}",
            "system_lib_prefix": manifest["system_lib_prefix"],
            "context_window": manifest["context_window"],
            "levels": [lv["fraction"] for lv in elastic["levels"]],
            "latency": f"{model_id}/latency.json" if (build / "latency.json").is_file() else None,
            # levels with a recovery adapter; its tensors are "adapter/<fraction>/..." in the params tensor cache
            "adapters": {"levels": manifest["adapter_levels"], "prefix": "adapter/"} if manifest["adapter_levels"] else None,
            "tlm": _tlm_entry(build, model_id) if manifest.get("tlm") else None,
        })
    (staged / APP_CONFIG).write_text(json.dumps({"schema": "elastilm.app", "schema_version": 1, "models": entries}, indent=2) + "\n")
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    (staged / MANIFEST).write_text(json.dumps({
        "schema": SCHEMA,
        "schema_version": VERSION,
        "elastilm_version": __version__,
        "tvm_version": tvm.__version__,
        "files": {f: sha256(staged / f) for f in files},
    }, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staged.rename(out)  # a failed packaging never leaves a half-written bundle under the final name
    return out


def _tlm_entry(build: Path, model_id: str) -> dict:
    """Where the app finds the model's TLM and what its heads choose between."""
    manifest = json.loads((build / "tlm" / "manifest.json").read_text())
    meta = json.loads((build / "tlm" / "tlm.json").read_text())
    return {"library": f"{model_id}/tlm/{manifest['library']}", "tokenizer": f"{model_id}/tlm/tokenizer.json",
            "window": meta["window"], "ratios": meta["ratios"], "levels": meta["levels"]}


def read_bundle(bundle: Path) -> dict:
    """The app config, after checking the bundle's schema, TVM version and the sha256 of every file."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise ElastiLMError(f"{bundle}: not a bundle (no {MANIFEST}); make one with `elastilm package`")
    doc = json.loads(path.read_text())
    if (doc.get("schema"), doc.get("schema_version")) != (SCHEMA, VERSION):
        raise ElastiLMError(f"{path}: schema {doc.get('schema')} v{doc.get('schema_version')}, expected {SCHEMA} v{VERSION}")
    if doc["tvm_version"] != tvm.__version__:
        raise ElastiLMError(f"{bundle}: packaged with TVM {doc['tvm_version']}, this runtime has TVM {tvm.__version__}")
    verify_files(bundle, doc["files"], MANIFEST)
    return json.loads((bundle / APP_CONFIG).read_text())


def load_bundle(bundle: Path, model_id: str | None = None, **engine_args) -> ElasticEngine:
    """An engine for one model of a verified bundle (the only one, or `model_id`)."""
    config = read_bundle(bundle)
    ids = [m["model_id"] for m in config["models"]]
    if model_id is None and len(ids) == 1:
        model_id = ids[0]
    if model_id not in ids:
        raise ElastiLMError(f"{bundle}: pick a model with --model; the bundle has {', '.join(ids)}")
    return ElasticEngine(Path(bundle) / model_id, **engine_args)
