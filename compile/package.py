"""App bundles: one folder an app ships as assets, with every build it needs and an app config that lists them
(formats/bundle.py). The runtime loads one with `ElasticEngine.from_bundle`."""

from __future__ import annotations

import shutil
from pathlib import Path

from elastilm.formats import build as build_file
from elastilm.formats import bundle, elastic
from elastilm.formats import tlm as tlm_file
from elastilm.formats.errors import ElastiLMError


def package(builds: list[Path], out: Path) -> Path:
    """Copy verified build folders into a bundle at `out` and write its app config and manifest. An existing `out`
    must be a bundle (or an empty folder): it is replaced only once the new bundle is complete."""
    out = Path(out)
    if out.exists() and not (out / bundle.APP_CONFIG).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ElastiLMError(
            f"{out} exists and is not an app bundle (no {bundle.APP_CONFIG}); choose another --out, or remove it first"
        )
    entries, seen = [], set()
    staged = out.with_name(out.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    for build in map(Path, builds):
        manifest = build_file.read_manifest(build, runs=None)  # any target: the app loads it, not this machine
        scheme = manifest["quantization"]["scheme"]
        # the fp32 build keeps the plain name; a quantized one adds its scheme, so one bundle can carry both
        model_id = f"{manifest['model']}-{manifest['target']['name']}" + (f"-{scheme}" if scheme != "q0f32" else "")
        if model_id in seen:
            raise ElastiLMError(f"two builds of {model_id} in one bundle")
        seen.add(model_id)
        shutil.copytree(build, staged / model_id, ignore=shutil.ignore_patterns("*.png"))
        entries.append(
            {
                "model_id": model_id,
                "model": manifest["model"],
                "target": manifest["target"]["name"],
                "library": f"{model_id}/{manifest['library']}",
                "system_lib_prefix": manifest["system_lib_prefix"],
                "context_window": manifest["context_window"],
                "quantization": manifest["quantization"],  # the scheme and its formats (formats/quant.py)
                "levels": list(elastic.levels(elastic.read(build))),
                "latency": f"{model_id}/latency.json" if (build / "latency.json").is_file() else None,
                # levels with a recovery adapter; its tensors are "adapter/<fraction>/..." in the params tensor cache
                "adapters": {"levels": manifest["adapter_levels"], "prefix": "adapter/"}
                if manifest["adapter_levels"]
                else None,
                "tlm": _tlm_entry(build, model_id) if manifest.get("tlm") else None,
            }
        )
    bundle.write(staged, entries)
    # a failed packaging never leaves a half-written bundle under the final name, and the old bundle stays whole
    # until the new one is: moved aside, the new one renamed in, then the old one deleted
    previous = out.with_name(out.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staged.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return out


def _tlm_entry(build: Path, model_id: str) -> dict:
    """Where the app finds the model's TLM and what its heads choose between."""
    folder = build / tlm_file.FOLDER
    manifest, meta = tlm_file.read_manifest(folder, verify=False), tlm_file.read_meta(folder)
    return {
        "library": f"{model_id}/tlm/{manifest['library']}",
        "tokenizer": f"{model_id}/tlm/{tlm_file.TOKENIZER}",
        "window": meta["window"],
        "ratios": meta["ratios"],
        "levels": meta["levels"],
    }
