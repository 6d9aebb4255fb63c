"""Latency profiles and app bundles: written, reloaded, and refused when anything in them changed."""

import json
import shutil

import pytest
from conftest import elastified_tiny

from elastilm.compile.build import build
from elastilm.compile.package import package
from elastilm.formats.bundle import APP_CONFIG
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.latency import FILE as LATENCY
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.runtime_py.profile import profile, write


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = elastified_tiny(tmp_path_factory, "llama", neuron_multiple=8)
    host = build(out, "host-cpu", max_len=40)
    engine = ElasticEngine(host)
    write(profile(engine, prompt_lengths=(4, 16, 64), decode_tokens=3, repeat=1, progress=False), host)
    return host, build(out, "android-arm64-cpu", max_len=40), engine


def test_profile_measures_every_level_within_the_context_window(builds):
    host, _, engine = builds
    doc = json.loads((host / LATENCY).read_text())
    assert doc["prompt_lengths"] == [4, 16]  # 64 + 3 decode tokens do not fit the 40-token window
    assert [row["fraction"] for row in doc["levels"]] == sorted(engine.levels)
    assert all(len(row["tpot_ms"]) == 2 for row in doc["levels"])  # one TPOT after each prompt length
    assert all(t > 0 for row in doc["levels"] for t in row["ttft_ms"] + row["tpot_ms"])
    assert (host / "latency.png").stat().st_size > 0


def test_bundle_lists_both_builds_and_reloads(builds, tmp_path):
    host, android, engine = builds
    bundle = package([host, android], tmp_path / "bundle")
    config = json.loads((bundle / APP_CONFIG).read_text())
    by_target = {m["target"]: m for m in config["models"]}
    assert by_target["android-arm64-cpu"]["library"].endswith("model.tar")
    assert by_target["android-arm64-cpu"]["system_lib_prefix"].endswith("_")
    assert by_target["host-cpu"]["latency"].endswith(LATENCY) and by_target["android-arm64-cpu"]["latency"] is None
    with pytest.raises(ElastiLMError, match="pick a model with --model"):
        ElasticEngine.from_bundle(bundle)
    loaded = ElasticEngine.from_bundle(bundle, by_target["host-cpu"]["model_id"])
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert list(loaded.generate_ids(ids, 0.5, 8)) == list(engine.generate_ids(ids, 0.5, 8))


@pytest.mark.parametrize("victim", ["params/tensor-cache.json", "latency.json", "model.so", "manifest.json"])
def test_a_changed_file_refuses_the_bundle(builds, tmp_path, victim):
    host, _, _ = builds
    bundle = package([host], tmp_path / "bundle")
    model_id = json.loads((bundle / APP_CONFIG).read_text())["models"][0]["model_id"]
    path = bundle / model_id / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ElastiLMError, match=f"{model_id}/{victim}: sha256 mismatch"):
        ElasticEngine.from_bundle(bundle)


def test_a_bundle_from_another_tvm_is_refused(builds, tmp_path):
    host, _, _ = builds
    bundle = package([host], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tvm_version"] = "0.0.1"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ElastiLMError, match="packaged with TVM 0.0.1"):
        ElasticEngine.from_bundle(bundle)


def test_packaging_refuses_a_corrupt_build_and_leaves_no_bundle(builds, tmp_path):
    host, _, _ = builds
    copy = tmp_path / "copy"
    shutil.copytree(host, copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ElastiLMError, match="tokenizer.json: sha256 mismatch"):
        package([copy], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_packaging_into_a_folder_that_is_not_a_bundle_is_refused_and_loses_nothing(builds, tmp_path):
    host, _, _ = builds
    precious = tmp_path / "my-project"
    precious.mkdir()
    (precious / "notes.txt").write_text("years of work")
    with pytest.raises(ElastiLMError, match="my-project exists and is not an app bundle"):
        package([host], precious)
    assert (precious / "notes.txt").read_text() == "years of work"
    with pytest.raises(ElastiLMError, match="is not an app bundle"):
        package([host], host)  # a build folder is not a bundle either
    assert (host / "manifest.json").is_file()
    (tmp_path / "empty").mkdir()
    package([host], tmp_path / "empty")  # an empty folder is fine


def test_a_failed_repackaging_leaves_the_old_bundle_whole(builds, tmp_path):
    host, _, _ = builds
    bundle = package([host], tmp_path / "bundle")
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    copy = tmp_path / "copy"
    shutil.copytree(host, copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ElastiLMError, match="sha256 mismatch"):
        package([copy], bundle)
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before
    ElasticEngine.from_bundle(bundle).close()
    package([host], bundle)  # a bundle is replaced by a new one
    assert not (tmp_path / "bundle.previous").exists() and not (tmp_path / "bundle.partial").exists()
