"""Compile and run TVM-generated OpenCL kernels on PoCL (the CPU OpenCL implementation, Debian pocl-opencl-icd).

The apache-tvm wheel generates OpenCL C but has no OpenCL runtime, and TVM accepts kernel source that no
OpenCL compiler would (docs/tvm-notes.md section 9). So every OpenCL build is compiled here by a real OpenCL compiler
before it ships, and the elastic operators are run here and compared with numpy.

Running a kernel needs its launch: TVM lowers a PrimFunc to a host function that binds shape variables and
calls `call_ffi_kernel(name, args..., launch extents...)`. `run` lowers the function the same way and walks
that host code with the shapes of the given arrays, so the launches are exactly the ones a device would see.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.sym.analyzer import Analyzer
from tvm.tirx.build import codegen_build, split_host_device_mods

from elastilm.formats.errors import ElastiLMError


def available() -> bool:
    """True when pyopencl is installed and an OpenCL platform (PoCL) is registered."""
    return _context(required=False) is not None


_CONTEXT = None


def _context(required: bool = True):
    global _CONTEXT
    if _CONTEXT is None:
        try:
            import pyopencl as cl

            devices = [d for p in cl.get_platforms() for d in p.get_devices()]
            _CONTEXT = cl.Context(devices[:1]) if devices else None
        except Exception:  # no ICD loader or no platform: the check is not possible here
            _CONTEXT = None
    if _CONTEXT is None and required:
        raise ElastiLMError(
            "no OpenCL platform: install Debian's pocl-opencl-icd and `pip install pyopencl` to check OpenCL kernels"
        )
    return _CONTEXT


def _dtype(expr) -> str:
    """dtype of a scalar expression; of the element for a data pointer."""
    ty = expr.ty
    return str(ty.dtype if hasattr(ty, "dtype") else ty.element_type.dtype)


def _buffer_of(expr):
    """The buffer var of `buffer_data(buf)`, the form kernel pointer arguments take; else None."""
    if getattr(getattr(expr, "op", None), "name", None) == "tirx.buffer_data":
        return expr.args[0]
    return None


def opencl_source(module: tvm.runtime.Module) -> str:
    """The OpenCL C source inside a built module (the host module imports the device module)."""
    if module.kind == "opencl":
        return module.inspect_source()
    for imported in module.imports:
        source = opencl_source(imported)
        if source:
            return source
    return ""


def compile_source(source: str):
    """Compile OpenCL C with the platform's compiler; raises ElastiLMError with the compiler log on failure."""
    import pyopencl as cl

    try:
        return cl.Program(_context(), source).build()
    except cl.RuntimeError as err:
        raise ElastiLMError(f"generated OpenCL kernels do not compile:\n{err}") from None


def run(
    func: tirx.PrimFunc, target: tvm.target.Target, arrays: dict[str, np.ndarray], scalars: dict[str, int]
) -> dict[str, np.ndarray]:
    """Run a scheduled PrimFunc on PoCL. `arrays` maps every buffer parameter's name to its contents in the
    parameter's dtype (outputs included: pass them poisoned), `scalars` the scalar parameters. Returns the buffers
    after the run."""
    import pyopencl as cl

    ctx = _context()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target.host or "llvm"))(mod)
    lower, _, finalize_device = tvm.tirx.get_tir_pipeline("default")  # what tvm.compile uses for the kernels
    host, devices = split_host_device_mods(lower(mod))  # lowered once: host code for the launches, device code to run
    ((device_target, device_mod),) = devices.items()
    source = codegen_build(finalize_device()(device_mod), device_target).inspect_source()
    program = compile_source(source)
    queue = cl.CommandQueue(ctx)

    ana = Analyzer()
    values: dict[str, int] = dict(scalars)
    for param in func.params:  # shape variables take their values from the arrays
        if param.name in arrays:
            for dim, n in zip(param.shape, arrays[param.name].shape):
                if isinstance(dim, tirx.Var):
                    values[dim.name] = n
    device_buffers = {
        n: cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a))
        for n, a in arrays.items()
    }
    bound: list = []  # (buffer var, device buffer); tvm vars compare by identity via same_as

    def lookup(buf):
        return next((d for b, d in reversed(bound) if b.same_as(buf)), None)

    def value(expr) -> int:
        if isinstance(expr, int):
            return expr
        out = ana.simplify(expr)
        if not isinstance(out, tirx.IntImm):
            raise ElastiLMError(f"cannot evaluate launch argument {expr} (unbound: {out})")
        return int(out.value)

    def bind(var, n: int):
        ana.bind(var, tirx.IntImm(_dtype(var), n))

    def visit(stmt):
        kind = type(stmt).__name__
        if kind == "SeqStmt":
            for s in stmt.seq:
                visit(s)
        elif kind in ("AttrStmt", "IfThenElse"):
            visit(stmt.body if kind == "AttrStmt" else stmt.then_case)
        elif kind == "Bind":
            name = stmt.var.name
            if name in values and _dtype(stmt.var).startswith("int"):
                bind(stmt.var, values[name])
            else:
                try:
                    bind(stmt.var, value(stmt.value))
                except Exception:  # handles, type checks: not needed for launches
                    pass
        elif kind == "DeclBuffer":  # a parameter's buffer, or a view of another buffer
            buf = stmt.buffer
            source = _buffer_of(buf.data)
            found = lookup(source) if source is not None else None
            bound.append((buf, found if found is not None else device_buffers.get(buf.name)))
        elif kind == "AllocBuffer":  # an intermediate in device memory
            buf = stmt.buffer
            size = int(np.prod([value(d) for d in buf.shape])) * np.dtype(_dtype(buf.data)).itemsize
            bound.append((buf, cl.Buffer(ctx, cl.mem_flags.READ_WRITE, max(size, 4))))
        elif kind == "Evaluate":
            call = stmt.value
            if getattr(getattr(call, "op", None), "name", None) == "tirx.call_ffi_kernel":
                launch(call)

    def launch(call):
        name = call.args[0].value
        launch_params = list(call.attrs.launch_params)
        args, extents = call.args[1 : -len(launch_params)], [value(e) for e in call.args[-len(launch_params) :]]
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, n in zip(launch_params, extents):
            axis = "xyz".index(tag[-1])
            (grid if tag.startswith("blockIdx") else block)[axis] = n
        kernel_args = [
            lookup(_buffer_of(a)) if _buffer_of(a) is not None else np.dtype(_dtype(a)).type(value(a)) for a in args
        ]
        dims = 3 if grid[2] * block[2] > 1 else 2 if grid[1] * block[1] > 1 else 1
        getattr(program, name)(
            queue, tuple(g * b for g, b in zip(grid, block))[:dims], tuple(block)[:dims], *kernel_args
        )

    visit(host["main"].body)
    out = {}
    for n, a in arrays.items():
        result = np.empty_like(a)
        cl.enqueue_copy(queue, result, device_buffers[n])
        out[n] = result
    queue.finish()
    return out
