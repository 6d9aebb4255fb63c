"""TVM RPC server for the qemu stand-in phone (runs under qemu-aarch64, started by serve.sh).

`python -m tvm.exec.rpc_server` cannot be used here: its rpc.Server starts the
listener in a PopenWorker, i.e. it re-executes sys.executable (an arm64 ELF),
which fails with "Exec format error" unless binfmt_misc is set up for qemu.
This runs the same listener (tvm.rpc.server.PopenRPCServerState) in this
process instead; each client session still gets its own fork()ed child, as in
the stock server.
"""

import argparse
import logging
import multiprocessing
import os
import platform
import signal
import sys
import time

t0 = time.time()
ap = argparse.ArgumentParser()
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--key", default="")
ap.add_argument("--tracker", default=None, help="host:port of an RPC tracker to register with")
args = ap.parse_args()

logging.basicConfig(level=logging.INFO, format="[qemu-phone] %(asctime)s %(message)s", stream=sys.stdout)

import tvm  # noqa: E402
from tvm.rpc import server  # noqa: E402

tracker = None
if args.tracker:
    th, tp = args.tracker.rsplit(":", 1)
    tracker = (th, int(tp))

state = server.PopenRPCServerState(
    args.host,
    port=args.port,
    port_end=args.port + 1,  # exactly this port, or fail
    is_proxy=False,
    tracker_addr=tracker,
    key=args.key,
)
print(
    f"qemu-phone: TVM {tvm.__version__} RPC server ready on {args.host}:{state.port} "
    f"({platform.machine()}, python {platform.python_version()}, started in {time.time() - t0:.1f}s)",
    flush=True,
)


MAIN_PID = os.getpid()


def _stop(signum, _frame):
    if os.getpid() != MAIN_PID:  # a session child (fork inherits this handler)
        os._exit(0)
    # End open sessions (fork()ed children), then exit without waiting for the
    # listener thread, which blocks in accept().
    for child in multiprocessing.active_children():
        child.terminate()
    print(f"qemu-phone: stopped (signal {signum})", flush=True)
    os._exit(0)


signal.signal(signal.SIGINT, _stop)
signal.signal(signal.SIGTERM, _stop)
# Timed joins: under qemu-user a signal may land on the listener thread, and an
# untimed join() would then never return to run the Python-level handler.
while state.thread.is_alive():
    state.thread.join(0.5)
