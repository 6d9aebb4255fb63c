"""The thin serving runtime: load a bundle locally or over TVM RPC, KV cache, prefill/decode at a level."""

import os
import sys

# TVM's thread pool counts hardware threads and uses half of them (it assumes two per core), so on a 2-core
# machine the kernels ran on one core. Use every core this process may run on, unless the user set a number;
# the pool reads this when it first starts, which is after this import.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def _load_tvm_without_torch() -> None:
    """Load TVM without the torch import that tvm_ffi makes whenever torch is installed (docs/tvm-notes.md section
    14): serving never uses torch, and it is about 200 MiB of a serving process's resident memory. Where torch is
    loaded already (training, evaluation), TVM loads as usual; torch stays importable afterwards either way."""
    if "tvm" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tvm_ffi's import tolerates
    try:
        import tvm  # noqa: F401
    finally:
        del sys.modules["torch"]


_load_tvm_without_torch()
