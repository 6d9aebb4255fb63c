"""The on-disk formats share one schema-and-version check and whole-file writes; the compiled library's signature
is declared once, and the export's functions take exactly those arguments in that order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model

from elastilm.formats import adapters, build, bundle, elastic, latency, layer_drop, signature, tlm
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import write_json
from elastilm.formats.widths import Level, LevelTable

ROOT = Path(__file__).resolve().parents[1]

# each format's reader, the file it reads, and its (schema, version)
READERS = {
    "elastic": (lambda d: elastic.read(d), elastic.FILE, (elastic.SCHEMA, elastic.VERSION)),
    "build": (lambda d: build.read_manifest(d, verify=False, runs=None), build.MANIFEST, (build.SCHEMA, build.VERSION)),
    "tlm": (lambda d: tlm.read_meta(d), tlm.META, (tlm.META_SCHEMA, tlm.META_VERSION)),
    "tlm-build": (lambda d: tlm.read_manifest(d, verify=False), tlm.MANIFEST, (tlm.BUILD_SCHEMA, tlm.BUILD_VERSION)),
    "bundle": (lambda d: bundle.read(d), bundle.MANIFEST, (bundle.SCHEMA, bundle.VERSION)),
    "latency": (lambda d: latency.read(d / latency.FILE), latency.FILE, (latency.SCHEMA, latency.VERSION)),
    "recover": (lambda d: adapters.read_summary(d), adapters.SUMMARY, (adapters.SCHEMA, adapters.VERSION)),
    "layer-drop": (lambda d: layer_drop.read_variants(d, 4), layer_drop.FILE, (layer_drop.SCHEMA, layer_drop.VERSION)),
}


@pytest.mark.parametrize("name", list(READERS))
def test_every_format_refuses_another_schema_version_by_name(name, tmp_path):
    read, file, (schema, version) = READERS[name]
    assert schema.startswith("elastilm.") and isinstance(version, int)
    (tmp_path / file).write_text(json.dumps({"schema": schema, "schema_version": version + 1}))
    with pytest.raises(
        ElastiLMError, match=rf"schema {schema} v{version + 1}, this elastilm reads {schema} v{version}"
    ):
        read(tmp_path)
    (tmp_path / file).write_text(json.dumps({"schema": "elastilm.other", "schema_version": version}))
    with pytest.raises(ElastiLMError, match="schema elastilm.other"):
        read(tmp_path)
    (tmp_path / file).write_text("{not json")
    with pytest.raises(ElastiLMError, match="not valid JSON"):
        read(tmp_path)


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = write_json(tmp_path / "doc.json", {"a": 1})

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}


def test_levels_are_found_by_their_exact_fraction():
    table = LevelTable([Level(1.0, 4, 64, 1.0), Level(0.5, 2, 32, 0.5), Level(0.7, 3, 40, 0.71)])
    assert list(table) == [0.5, 0.7, 1.0] and table.full.fraction == 1.0
    assert table[float("0.7")] is table[round(0.1 * 7, 1)]  # parsed text and the rounded table agree exactly
    for wrong in (0.70001, 0.55, "0.5"):
        with pytest.raises(ElastiLMError, match="unknown level .*; valid levels are 0.5, 0.7, 1"):
            table[wrong]
    assert Level(0.5, 2, 32, 0.5).neuron_blocks(8) == 4
    with pytest.raises(ElastiLMError, match="not whole blocks of 64"):
        Level(0.5, 2, 32, 0.5).neuron_blocks(64)


def test_exported_functions_take_the_declared_arguments_in_order():
    from elastilm.compile.export import ExportShape, export

    _, _, cfg = tiny_model("llama")
    mod, _ = export(cfg, ExportShape(anchors=(1,), neuron_block=8, max_len=64, layer_drops=((1, (2,)),)))
    names = signature.function_names([1])
    assert names == ["embed", "prefill", "decode", "score", "prefill_drop1", "decode_drop1", "score_drop1"]
    for name in names[1:]:
        assert [p.name for p in mod[name].params] == [*signature.ARGUMENTS, "packed_params"], name
    assert signature.arguments(**{a: i for i, a in enumerate(reversed(signature.ARGUMENTS))}) == (5, 4, 3, 2, 1, 0)
    with pytest.raises(TypeError, match="model functions take"):
        signature.arguments(embeddings=0, caches=1)


def test_an_upward_import_breaks_the_layer_contract(tmp_path):
    """import-linter over a copy of the package: clean, the contracts hold; with one upward import added (the bottom
    layer importing the runtime), the run fails and names it."""
    package = tmp_path / "elastilm"
    shutil.copytree(
        ROOT,
        package,
        ignore=shutil.ignore_patterns(
            ".*", "dist", "tests", "benchmarks", "scripts", "docs", "data", "*.egg-info", "__pycache__"
        ),
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    lint = [
        str(Path(sys.executable).with_name("lint-imports")),
        "--config",
        str(package / "pyproject.toml"),
        "--no-cache",
    ]
    clean = subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    files = package / "formats" / "files.py"
    files.write_text(files.read_text() + "\nfrom elastilm.runtime_py import engine  # noqa\n")
    broken = subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert broken.returncode != 0
    assert "elastilm.formats.files -> elastilm.runtime_py.engine" in broken.stdout
