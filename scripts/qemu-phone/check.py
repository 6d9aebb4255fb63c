"""End-to-end check of the qemu stand-in phone, run from the x86 side:

    scripts/qemu-phone/serve.sh 9090 &          # wait for "ready"
    .venv/bin/python scripts/qemu-phone/check.py --port 9090

Cross-compiles (1) a TE add-one kernel and (2) a small Relax function for
aarch64, uploads both over TVM RPC, and runs them on the phone: the first via
remote.load_module, the second through relax.VirtualMachine on remote.cpu().
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, rpc, te
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.support import cc

TARGET = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
FCOMPILE = cc.cross_compiler("aarch64-linux-gnu-gcc")


def stamp(msg, t0):
    print(f"  {msg:<48s} {time.perf_counter() - t0:7.2f} s", flush=True)


def build_addone(tmp: Path) -> Path:
    n = te.var("n")
    a = te.placeholder((n,), "float32", name="A")
    b = te.compute((n,), lambda i: a[i] + 1.0, name="B")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "addone")
    lib = tvm.compile(tvm.IRModule({"addone": func}), target=TARGET)
    path = tmp / "addone.so"
    lib.export_library(str(path), fcompile=FCOMPILE)
    return path


@I.ir_module
class Tiny:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 3), "float32")) -> R.Tensor((4, 3), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.relu(R.add(y, R.const(1.0, "float32")))
            R.output(z)
        return z


def build_relax(tmp: Path) -> Path:
    ex = tvm.compile(Tiny, target=TARGET)
    path = tmp / "tiny_relax.so"
    ex.export_library(str(path), fcompile=FCOMPILE)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--bench", action="store_true", help="also time a naive 256^3 matmul: phone vs. this x86 host")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qemu-phone-check-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> int:
    t0 = time.perf_counter()
    print(f"cross-compiling for {TARGET}")
    addone_so = build_addone(tmp)
    stamp("TE add-one built + linked", t0)
    relax_so = build_relax(tmp)
    stamp("Relax VM executable built + linked", t0)

    t0 = time.perf_counter()
    print(f"RPC to {args.host}:{args.port}")
    remote = rpc.connect(args.host, args.port, session_timeout=600)
    stamp("connect (server forks a session)", t0)
    dev = remote.cpu()
    x = np.random.default_rng(0).standard_normal(1000).astype("float32")
    a = tvm.runtime.tensor(x, dev)
    stamp("first call (allocate + copy to remote)", t0)
    remote.upload(str(addone_so))
    stamp("upload addone.so", t0)
    f = remote.load_module("addone.so")
    stamp("remote.load_module(addone.so)", t0)
    b = tvm.runtime.empty((1000,), "float32", dev)
    f["addone"](a, b)
    dev.sync()
    np.testing.assert_allclose(b.numpy(), x + 1.0, rtol=1e-6)
    stamp("addone run + check: OK", t0)
    t1 = time.perf_counter()
    for _ in range(10):
        f["addone"](a, b)
    dev.sync()
    print(f"  (warm add-one call: {(time.perf_counter() - t1) / 10 * 1e3:.1f} ms per call over RPC)")

    remote.upload(str(relax_so))
    stamp("upload tiny_relax.so", t0)
    rlib = remote.load_module("tiny_relax.so")
    vm = relax.VirtualMachine(rlib, dev)
    stamp("relax.VirtualMachine(remote_lib, remote.cpu())", t0)
    rng = np.random.default_rng(1)
    xn = rng.standard_normal((4, 8)).astype("float32")
    wn = rng.standard_normal((8, 3)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(xn, dev), tvm.runtime.tensor(wn, dev))
    np.testing.assert_allclose(out.numpy(), np.maximum(xn @ wn + 1.0, 0.0), rtol=1e-5, atol=1e-5)
    stamp("Relax VM main() run + check: OK", t0)

    if args.bench:
        bench(remote, tmp)
    print("ALL OK")
    return 0


def bench(remote, tmp: Path, n: int = 256) -> None:
    """Same unscheduled TE matmul, natively on x86 and on the phone under qemu."""
    a_np = np.random.rand(n, n).astype("float32")
    b_np = np.random.rand(n, n).astype("float32")
    for name, target in (("x86 host (native)", "llvm"), ("phone (qemu aarch64)", TARGET)):
        A = te.placeholder((n, n), "float32", name="A")
        B = te.placeholder((n, n), "float32", name="B")
        k = te.reduce_axis((0, n), "k")
        C = te.compute((n, n), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k), name="C")  # noqa: B023 (traced at once)
        func = te.create_prim_func([A, B, C]).with_attr("global_symbol", "mm")
        lib = tvm.compile(tvm.IRModule({"mm": func}), target=target)
        if target == "llvm":
            mod, dev = lib.mod, tvm.cpu()
        else:
            lib.export_library(str(tmp / "mm.so"), fcompile=FCOMPILE)
            remote.upload(str(tmp / "mm.so"))
            mod, dev = remote.load_module("mm.so"), remote.cpu()
        args = [tvm.runtime.tensor(x, dev) for x in (a_np, b_np, np.zeros((n, n), "float32"))]
        ms = mod.time_evaluator("mm", dev, number=3, repeat=1)(*args).mean * 1e3
        np.testing.assert_allclose(args[2].numpy(), a_np @ b_np, rtol=1e-3)
        print(f"  matmul {n}x{n}x{n} fp32, {name:<22s} {ms:8.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
