"""GPU schedules for the elastic operators: TVM's dlight rules, with one guard for symbolic widths.

With an Android host, dlight's Adreno GEMV stages the input vector in shared memory sized by the reduction
extent. For the elastic decode kernels that extent is symbolic (active heads * head_dim, active neurons), and
the OpenCL code generator cannot allocate it ("constant size stack allocation"). The guard rejects any schedule
that allocates shared or local memory of non-constant size, so the next rule in the list schedules the kernel.
It also passes over a rule that fails on a kernel it claimed (GeneralReduction on the LoRA chain, two
reductions in a row) instead of failing the build.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.schedule import ScheduleError


class ConstantScratch(dl.ScheduleRule):
    """`rule`, unless its schedule allocates scratch memory whose size depends on a symbolic width."""

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        try:
            sch = self.rule.apply(func, target, tunable)
        except ScheduleError:
            return None
        if sch is None or isinstance(sch, list):
            return sch
        scratch = [b for b in sch.get(get_root_block(sch)).alloc_buffers if b.scope().startswith(("shared", "local"))]
        if all(isinstance(d, tirx.IntImm) for buf in scratch for d in buf.shape):
            return sch
        return None


def rules() -> list[dl.ScheduleRule]:
    return [
        ConstantScratch(rule)
        for rule in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    ]


def pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pipeline for GPUs: TVM's generic GPU pipeline with the guarded dlight rules."""
    from tvm.relax.backend.gpu_generic import pipeline as gpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                gpu.library_dispatch_passes(target)
                + [
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    dl.ApplyDefaultSchedule(*rules()),
                ]
                + gpu.dataflow_lower_passes(target)
                + gpu.finalize_passes(target)
            )(mod)

    return _pipeline
