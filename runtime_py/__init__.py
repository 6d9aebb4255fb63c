"""The thin serving runtime: load a bundle locally or over TVM RPC, KV cache, prefill/decode at a level."""

import os

# TVM's thread pool counts hardware threads and uses half of them (it assumes two per core), so on a 2-core
# machine the kernels ran on one core. Use every core this process may run on, unless the user set a number;
# the pool reads this when it first starts, which is after this import.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
