"""Target presets, one JSON data file each in this folder; `preset(name)` reads one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elastilm import ElastiLMError

_FOLDER = Path(__file__).parent


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    target: dict
    output: str  # library file kind: "so" or "tar"
    detect_host_cpu: bool = False
    schedule: str = "default"  # "cpu": our hand schedules (elastic_ops.schedule_cpu); "default": TVM's pipeline
    notes: str = ""

    def tvm_target(self):
        """The TVM Target; presets that say `detect_host_cpu` take the CPU of this machine."""
        import tvm

        if self.detect_host_cpu:
            return tvm.target.Target.from_device(tvm.cpu())
        return tvm.target.Target(self.target)


    def relax_pipeline(self):
        if self.schedule == "cpu":
            from elastilm.elastic_ops import schedule_cpu

            return schedule_cpu.pipeline(self.tvm_target())
        return "default"


def names() -> list[str]:
    return sorted(p.stem for p in _FOLDER.glob("*.json"))


def preset(name: str) -> TargetPreset:
    path = _FOLDER / f"{name}.json"
    if not path.is_file():
        raise ElastiLMError(f"unknown target '{name}'; valid targets are {', '.join(names())}")
    return TargetPreset(**json.loads(path.read_text()))
