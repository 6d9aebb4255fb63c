"""The device side of RPC: a TVM RPC server plus a file cache, so a build is uploaded once per device.

A plain TVM RPC server keeps uploads in a temporary folder that is deleted when the session ends, so every
session would upload the weights again. `serve` registers three functions in the server process that keep
files in a cache folder, keyed by the build's manifest hash and verified by sha256 on arrival:

  elastilm.device.path(key, relpath) -> absolute path of a cached file
  elastilm.device.has(key, relpath, size) -> whether that file is cached (with that size)
  elastilm.device.commit(upload, key, relpath, sha256) -> moves an uploaded file into the cache, after checking it

A client that finds no such functions (e.g. a stock `python -m tvm.exec.rpc_server`) uploads per session.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

CACHE_ENV = "ELASTILM_DEVICE_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "elastilm-device")


def _cached(key: str, relpath: str) -> Path:
    path = (cache_root() / key / relpath).resolve()
    if cache_root().resolve() not in path.parents:  # relpath comes over the network
        raise ValueError(f"path outside the cache: {relpath}")
    return path


def register() -> None:
    """Register the cache functions in this process (the RPC server's init callback)."""
    import tvm

    from elastilm.formats.files import sha256

    def has(key: str, relpath: str, size: int) -> bool:
        path = _cached(key, relpath)
        return path.is_file() and path.stat().st_size == size

    def commit(upload: str, key: str, relpath: str, digest: str) -> str:
        source = Path(upload).resolve()  # in the session's working folder
        if sha256(source) != digest:
            source.unlink()
            raise ValueError(f"{relpath}: sha256 mismatch after upload; not cached")
        target = _cached(key, relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), target)
        return str(target)

    tvm.register_global_func("elastilm.device.path", lambda key, relpath: str(_cached(key, relpath)), override=True)
    tvm.register_global_func("elastilm.device.has", has, override=True)
    tvm.register_global_func("elastilm.device.commit", commit, override=True)


def serve(
    host: str = "127.0.0.1", port: int = 9090, tracker: str | None = None, key: str = "", cache: Path | None = None
):
    """Run an RPC server until interrupted; with `tracker` (host:port) it registers under `key`."""
    from tvm import rpc

    if cache is not None:
        os.environ[CACHE_ENV] = str(Path(cache).resolve())  # inherited by the server process
    tracker_addr = None
    if tracker:
        tracker_host, _, tracker_port = tracker.rpartition(":")
        tracker_addr = (tracker_host, int(tracker_port))
    server = rpc.Server(
        host, port=port, port_end=port + 100, tracker_addr=tracker_addr, key=key, server_init_callback=register
    )
    where = f"{host}:{server.port}" + (f", registered with tracker {tracker} as '{key}'" if tracker else "")
    print(f"elastilm device: serving on {where}; cache {cache_root()}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
