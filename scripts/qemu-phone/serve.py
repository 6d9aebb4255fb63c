"""TVM RPC server for the qemu stand-in phone (runs under qemu-aarch64, started by serve.sh).

`python -m tvm.exec.rpc_server` cannot be used here: its rpc.Server starts the
listener in a PopenWorker, i.e. it re-executes sys.executable (an arm64 ELF),
which fails with "Exec format error" unless binfmt_misc is set up for qemu.
This runs the same listen loop (tvm.rpc.server._listen_loop) in this process,
in its main thread; each client session still gets its own fork()ed child, as in
the stock server. The main thread, not a second one: a fork() while another
thread runs is the one step of the server that qemu-user emulates unreliably
(forked children that hang are a known class of qemu-user bug), and a child
that hangs before it answers would block the phone for every later session.
A session whose child fails is logged and the loop goes on with the next.
"""

import argparse
import logging
import multiprocessing
import os
import platform
import signal
import socket
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

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((args.host, args.port))  # exactly this port, or fail
sock.listen(1)
print(
    f"qemu-phone: TVM {tvm.__version__} RPC server ready on {args.host}:{args.port} "
    f"({platform.machine()}, python {platform.python_version()}, started in {time.time() - t0:.1f}s)",
    flush=True,
)


MAIN_PID = os.getpid()


def _stop(signum, _frame):
    if os.getpid() != MAIN_PID:  # a session child (fork inherits this handler)
        os._exit(0)
    for child in multiprocessing.active_children():  # end open sessions (fork()ed children)
        child.terminate()
    print(f"qemu-phone: stopped (signal {signum})", flush=True)
    os._exit(0)


signal.signal(signal.SIGINT, _stop)
signal.signal(signal.SIGTERM, _stop)
while True:
    try:
        server._listen_loop(sock, args.port, args.key, tracker, None, None)
    except RuntimeError as err:  # a session's child exited with an error: serve the next one
        logging.warning("session failed: %s", err)
