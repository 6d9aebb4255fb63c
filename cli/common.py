"""Argument types and options that several commands share."""

from __future__ import annotations

import argparse
import os
import sys


def fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions such as 0.2,0.5,1.0, got '{text}'"
        ) from None


def names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def lengths(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", default=None, help="host:port of a device's RPC server (elastilm device serve)")
    p.add_argument("--tracker", default=None, help="host:port of an RPC tracker; with --key")
    p.add_argument("--key", default=None, help="device key registered with the tracker")
    p.add_argument("--quant", default=None, help="refuse a build whose weights are not this scheme (e.g. q4f32_1)")
    p.add_argument(
        "--rpc-timeout",
        type=float,
        default=60.0,
        help="seconds an RPC call may wait for the device before it counts as lost (more than the longest call: "
        "the qemu stand-in phone needs 600)",
    )
    p.add_argument(
        "--reconnect-for", type=float, default=30.0, help="seconds to keep reconnecting to a lost device, with back-off"
    )


def serving_process() -> None:
    """Serving commands (run, serve, device serve) load only TVM's runtime library, not its 259 MB compiler:
    111 MiB less resident memory (docs/tvm-notes.md section 14). The variable is TVM's own and is read once, when
    TVM first loads; it is put back afterwards so that the child processes this one starts load TVM as usual."""
    if "tvm" in sys.modules:
        return
    saved = os.environ.get("TVM_USE_RUNTIME_LIB")
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    try:
        import elastilm.runtime_py  # noqa: F401  (loads TVM)
    finally:
        if saved is None:
            del os.environ["TVM_USE_RUNTIME_LIB"]
        else:
            os.environ["TVM_USE_RUNTIME_LIB"] = saved


def engine(args):
    """The engine for --build or --bundle, local or on a device (--rpc / --tracker + --key)."""
    from elastilm.runtime_py.engine import ElasticEngine

    remote = dict(
        rpc=args.rpc,
        tracker=args.tracker,
        key=args.key,
        progress=True,
        quant=args.quant,
        rpc_timeout=args.rpc_timeout,
        reconnect_for=args.reconnect_for,
    )
    if getattr(args, "bundle", None):
        return ElasticEngine.from_bundle(args.bundle, args.model, **remote)
    return ElasticEngine(args.build, **remote)
