"""Target presets: every preset builds (or says exactly why it cannot), and the artifacts are for that target."""

import json
import shutil
import tarfile

import pytest
from conftest import elastified_tiny

from elastilm.compile.build import build
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.targets import names, preset

EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def elastified(tmp_path_factory):
    out = elastified_tiny(tmp_path_factory, "llama", neuron_multiple=8)
    return out


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


def test_presets_are_data_files():
    assert {"host-cpu", "android-arm64-cpu", "linux-arm64-cpu", "vulkan"} <= set(names())
    for name in names():
        assert preset(name).name == name


def test_android_build_is_a_system_library_of_arm64_objects(elastified, tmp_path):
    out = build(elastified, "android-arm64-cpu", tmp_path / "android", max_len=32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["library"] == "model.tar" and manifest["system_lib_prefix"].endswith("_")
    with tarfile.open(out / "model.tar") as tar:
        objects = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert "lib0.o" in objects and all(elf_machine(data) == EM_AARCH64 for data in objects.values())
    # the symbols are registered under the model's prefix, so two models can be linked into one app
    assert manifest["system_lib_prefix"].encode() in objects["lib0.o"]
    with pytest.raises(ElastiLMError, match="built for target 'android-arm64-cpu'.*build with --target host-cpu"):
        ElasticEngine(out)


def test_linux_arm64_build_is_an_arm64_shared_library(elastified, tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:  # .ci/run installs it; without it the error must say how
        with pytest.raises(ElastiLMError, match="apt-get install gcc-aarch64-linux-gnu"):
            build(elastified, "linux-arm64-cpu", tmp_path / "arm", max_len=32)
        return
    out = build(elastified, "linux-arm64-cpu", tmp_path / "arm", max_len=32)
    assert elf_machine((out / "model.so").read_bytes()) == EM_AARCH64


def test_vulkan_says_why_it_cannot_be_built(elastified, tmp_path):
    with pytest.raises(ElastiLMError, match="without Vulkan \\(SPIR-V\\) codegen.*USE_VULKAN ON"):
        build(elastified, "vulkan", tmp_path / "vk", max_len=32)
    assert not (tmp_path / "vk").exists()  # refused before any work


def test_unknown_target_lists_every_preset(elastified):
    with pytest.raises(ElastiLMError, match="unknown target 'adreno'; valid targets are " + ", ".join(names())):
        build(elastified, "adreno")


@pytest.mark.parametrize("name", ["adreno-opencl", "mali-opencl", "x86-opencl"])
def test_opencl_presets_build_kernels_that_pocl_compiles(elastified, tmp_path, name, pocl_platform):
    out = build(elastified, name, tmp_path / name, max_len=32, kernel_check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernels_checked"] == "pocl" and manifest["target"]["device"] == "opencl"
    assert len(manifest["levels_sha256"]) == 64
    if preset(name).output == "tar":  # host objects for arm64 Android plus the OpenCL source as devc.o
        with tarfile.open(out / "model.tar") as tar:
            objects = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        devc = next(n for n in objects if n.endswith("devc.o"))  # named after the system-lib prefix
        assert "lib0.o" in objects and elf_machine(objects["lib0.o"]) == EM_AARCH64
        assert b"__kernel void" in objects[devc]
    else:  # x86 host code: loadable here, but the wheel's runtime has no OpenCL, so the engine says so
        with pytest.raises(ElastiLMError, match="OpenCL.*no OpenCL runtime"):
            ElasticEngine(out)


@pytest.mark.parametrize("name", ["adreno-opencl", "x86-opencl"])
def test_quantized_opencl_builds_kernels_that_pocl_compiles(tmp_path_factory, tmp_path, name, pocl_platform):
    """The demo's weights (q4f32_mix: asymmetric 4-bit, 8-bit down_proj and table) in a GPU preset: every kernel
    compiled by PoCL (the quantized operators also run on PoCL against numpy, tests/test_opencl.py)."""
    folder = elastified_tiny(tmp_path_factory, "llama-grouped", neuron_multiple=32)
    out = build(folder, name, tmp_path / name, max_len=32, kernel_check=True, quantization="q4f32_mix")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernels_checked"] == "pocl" and manifest["quantization"]["scheme"] == "q4f32_mix"
    assert any(n.endswith(".q_min") for n in manifest["param_names"])
