"""The device side of RPC: a TVM RPC server plus a file cache, so a build is uploaded once per device.

A plain TVM RPC server keeps uploads in a temporary folder that is deleted when the session ends, so every
session would upload the weights again. `serve` registers three functions in the server process that keep
files in a cache folder, one folder per build (its key: a hash of the build's file digests):

  elastilm.device.path(key, relpath) -> absolute path of a cached file
  elastilm.device.has(key, relpath, size, sha256) -> whether that file is cached with that content
  elastilm.device.commit(upload, key, relpath, sha256) -> moves the session's upload `upload` (a file name in
                                                         the session's folder) into the cache, after checking it

What a client sends is confined: a key is 32 hex digits, a relpath stays inside its key's folder and names no
hidden file, an upload is a file of the session's own folder. A cached file is trusted only while it matches the
stamp taken when its digest was last checked (size, modification time, inode): a file changed since is hashed
again, and dropped (to be uploaded again) when its digest differs. The cache holds at most `quota` bytes
(ELASTILM_DEVICE_CACHE_QUOTA, default 16 GiB): after each commit the builds used least recently go first, never
the one being loaded.

Anyone who can reach the RPC port can run code on the device (TVM's RPC server loads whatever library a client
sends): serve on loopback or a private link, behind a tracker key (`--tracker --key`), as `elastilm device serve`
warns when it binds elsewhere.

A client that finds no such functions (e.g. a stock `python -m tvm.exec.rpc_server`) uploads per session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

CACHE_ENV = "ELASTILM_DEVICE_CACHE"
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the names of this machine's loopback (this server's, the service's)
QUOTA_ENV = "ELASTILM_DEVICE_CACHE_QUOTA"
DEFAULT_QUOTA = 16 << 30
KEY = re.compile(r"[0-9a-f]{32}")  # session._stage's key
STAMPS, USED = ".stamps.json", ".used"  # per key: verified file stamps; its mtime = the build's last use


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "elastilm-device")


def quota() -> int:
    return int(os.environ.get(QUOTA_ENV) or DEFAULT_QUOTA)


def _key_dir(key: str) -> Path:
    if not KEY.fullmatch(key):
        raise ValueError(f"not a build key: {key!r}")
    return cache_root() / key


def _cached(key: str, relpath: str) -> Path:
    folder = _key_dir(key).resolve()
    path = (folder / relpath).resolve()
    if folder not in path.parents or any(part.startswith(".") for part in Path(relpath).parts):
        raise ValueError(f"path outside its build's cache: {relpath}")  # relpath comes over the network
    return path


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _stamps(key: str) -> dict:
    file = _key_dir(key) / STAMPS
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def _save_stamps(key: str, stamps: dict) -> None:
    from elastilm.formats.files import write_json

    write_json(_key_dir(key) / STAMPS, stamps)


def _touch(key: str) -> None:
    used = _key_dir(key) / USED
    used.parent.mkdir(parents=True, exist_ok=True)
    used.touch()


def _evict(keep: str) -> None:
    """Delete the least recently used builds until the cache fits its quota (`keep` stays)."""

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    folders = [f for f in cache_root().iterdir() if f.is_dir() and KEY.fullmatch(f.name)]
    sizes = {f: size(f) for f in folders}
    total = sum(sizes.values())
    last_use = {f: (f / USED).stat().st_mtime if (f / USED).is_file() else 0.0 for f in folders}
    for folder in sorted(folders, key=last_use.get):
        if total <= quota():
            break
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]


def _survive_crashed_sessions() -> None:
    """TVM's server runs each session in a child process and raises when that child dies (a bad library, an
    out-of-memory kill), which ends its accept loop while the port stays open: later clients hang. In this server
    process, a crashed session is logged and the loop goes on to the next one."""
    import logging

    from tvm.rpc import server as rpc_server

    original = rpc_server._serving
    if getattr(original, "survives_crashes", False):
        return

    def serving(sock, addr, opts, load_library):
        cwd = os.getcwd()
        try:
            original(sock, addr, opts, load_library)
        except RuntimeError as err:
            logging.getLogger("elastilm.device").error("the session from %s crashed (%s); serving the next", addr, err)
            os.chdir(cwd)
            sock.close()

    serving.survives_crashes = True
    rpc_server._serving = serving


def register() -> None:
    """Register the cache functions in this process (the RPC server's init callback), and keep its accept loop
    alive after a crashed session."""
    import tvm

    _survive_crashed_sessions()

    from elastilm.formats.files import sha256

    def has(key: str, relpath: str, size: int, digest: str) -> bool:
        path = _cached(key, relpath)
        _touch(key)
        if not path.is_file() or path.stat().st_size != size:
            return False
        stamps = _stamps(key)
        if stamps.get(relpath) == [*_stamp(path), digest]:
            return True  # unchanged since its digest was checked
        if sha256(path) != digest:  # changed on the device since: upload it again
            path.unlink()
            stamps.pop(relpath, None)
            _save_stamps(key, stamps)
            return False
        _save_stamps(key, {**stamps, relpath: [*_stamp(path), digest]})
        return True

    def commit(upload: str, key: str, relpath: str, digest: str) -> str:
        if Path(upload).name != upload or upload.startswith("."):
            raise ValueError(f"not an upload of this session: {upload!r}")
        source = Path(tvm.get_global_func("tvm.rpc.server.workpath")(upload))  # the session's folder
        target = _cached(key, relpath)
        if sha256(source) != digest:
            source.unlink()
            raise ValueError(f"{relpath}: sha256 mismatch after upload; not cached")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), target)
        _save_stamps(key, {**_stamps(key), relpath: [*_stamp(target), digest]})
        _touch(key)
        _evict(keep=key)
        return str(target)

    def path(key: str, relpath: str) -> str:
        _touch(key)
        return str(_cached(key, relpath))

    tvm.register_global_func("elastilm.device.path", path, override=True)
    tvm.register_global_func("elastilm.device.has", has, override=True)
    tvm.register_global_func("elastilm.device.commit", commit, override=True)


def serve(
    host: str = "127.0.0.1", port: int = 9090, tracker: str | None = None, key: str = "", cache: Path | None = None
):
    """Run an RPC server until interrupted; with `tracker` (host:port) it registers under `key`."""
    from tvm import rpc

    if cache is not None:
        os.environ[CACHE_ENV] = str(Path(cache).resolve())  # inherited by the server process
    if host not in LOOPBACK:
        print(
            f"elastilm device: warning: serving on {host}: anyone who reaches this port can run code on this device "
            "(TVM RPC loads the libraries clients send); prefer loopback, a private link or a tracker key",
            flush=True,
        )
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
