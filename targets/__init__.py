"""Target presets, one JSON data file each in this folder; `preset(name)` reads one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elastilm.formats.errors import ElastiLMError

_FOLDER = Path(__file__).parent


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    target: dict
    output: str  # library file kind: "so" or "tar"
    detect_host_cpu: bool = False
    schedule: str = "default"  # "cpu": our hand schedules (elastic_ops.schedule_cpu); "gpu": dlight; "default": TVM's
    system_lib: bool = False  # functions registered in the process (static linking into an app)
    cross_compiler: str | None = None  # linker for a .so on another architecture
    cross_compiler_package: str | None = None
    requires_codegen: str | None = None  # TVM global function that must exist to generate device code
    missing_codegen_help: str = ""
    notes: str = ""

    def tvm_target(self):
        """The TVM Target; presets that say `detect_host_cpu` take the CPU of this machine."""
        import tvm

        if self.detect_host_cpu:
            return tvm.target.Target.from_device(tvm.cpu())
        return tvm.target.Target(self.target)

    def check_buildable(self) -> None:
        """Say exactly why this machine cannot build the preset, before any work starts."""
        import shutil

        import tvm

        if self.requires_codegen and tvm.get_global_func(self.requires_codegen, allow_missing=True) is None:
            raise ElastiLMError(f"target '{self.name}' cannot be built here: {self.missing_codegen_help}")
        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise ElastiLMError(
                f"target '{self.name}' links with {self.cross_compiler}, which is not installed: "
                f"apt-get install {self.cross_compiler_package}"
            )

    def export_library(self, executable, path) -> None:
        """Write the compiled library in this preset's output kind (.so, or .tar of object files)."""
        from tvm.support import cc, tar

        if self.output == "tar":
            executable.export_library(str(path), fcompile=tar.tar)
        elif self.cross_compiler:
            executable.export_library(str(path), fcompile=cc.cross_compiler(self.cross_compiler))
        else:
            executable.export_library(str(path))

    def native_half(self) -> bool:
        """Whether the target's CPU converts fp16 to fp32 in hardware (every aarch64; x86 with F16C), so that the
        kernels read fp16 bits with that instruction (elastic_ops.prefix.native_half). GPU presets: no (the PoCL
        here has no cl_khr_fp16, so OpenCL kernels carry no half type)."""
        if self.device != "cpu":
            return False
        from tvm.target.codegen import target_has_features

        target = self.tvm_target()
        return str(target.attrs.get("mtriple", "")).startswith("aarch64") or target_has_features("f16c", target)

    @property
    def device(self) -> str:
        """The TVM device kind the kernels run on: "cpu" for llvm targets, else the target kind (e.g. opencl)."""
        kind = self.target["kind"]
        return "cpu" if kind == "llvm" else kind

    def relax_pipeline(self, dense: bool = False):
        """The compile pipeline; `dense`: for a plain dense model (the TLM) instead of the elastic LLM."""
        if self.schedule == "cpu":
            from elastilm.elastic_ops import schedule_cpu

            return schedule_cpu.pipeline(
                self.tvm_target(), schedule_cpu.schedule_dense if dense else schedule_cpu.schedule_function
            )
        if self.schedule == "gpu":
            from elastilm.elastic_ops import schedule_gpu

            return schedule_gpu.pipeline(self.tvm_target())
        return "default"


def names() -> list[str]:
    return sorted(p.stem for p in _FOLDER.glob("*.json"))


def preset(name: str) -> TargetPreset:
    path = _FOLDER / f"{name}.json"
    if not path.is_file():
        raise ElastiLMError(f"unknown target '{name}'; valid targets are {', '.join(names())}")
    return TargetPreset(**json.loads(path.read_text()))
