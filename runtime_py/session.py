"""Where a build runs: in this process, or on a device over TVM RPC. The engine sees the same five operations.

Over RPC, containers cannot be sent from the client (only tensors, scalars and strings): shape tuples are made
by the device's `ffi.Shape`, and the parameter and KV-cache arrays are made on the device from its tensor cache
(`vm.builtin.tensor_cache.*`, part of every TVM runtime). Weights are loaded by the device from its own storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from elastilm.formats.errors import ElastiLMError

LOG = logging.getLogger("elastilm.session")
CACHE_NAME = "elastilm.{}.{}"  # device tensor-cache names of tensors made there (KV caches, zero adapters)


class LocalSession:
    endpoint = "this process"
    connections = 1  # see RemoteSession: handles never go stale here

    def __init__(self, device: str = "cpu"):
        self.device = tvm.device(device)

    def guard(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass

    def load(self, folder: Path, manifest: dict):
        """The VM of a build folder; its tensors (weights, adapters) become available to `arrays`."""
        from tvm.contrib.tvmjs import load_tensor_cache

        vm = VirtualMachine(tvm.runtime.load_module(str(folder / manifest["library"])), self.device)
        tensors, _ = load_tensor_cache(str(folder / "params"), self.device)
        self._tensors = {**getattr(self, "_tensors", {}), **tensors}  # a second build (the TLM) adds its own
        return vm

    def arrays(self, names: list[str]):
        """The loaded tensors `names`, in order, as one argument."""
        return [self._tensors[n] for n in names]

    def tensors(self, names: list[str]) -> list:
        """The loaded tensors `names`, one argument each."""
        return self.arrays(names)

    def zeros(self, shapes: list[tuple[int, ...]], tag: str, dtype: str = "float32"):
        """Zeroed tensors of `shapes` as one argument; equal shapes share one tensor unless `tag` is "kv"
        (each KV cache is written in place)."""
        if tag == "kv":
            return [tvm.runtime.tensor(np.zeros(s, dtype), self.device) for s in shapes]
        shared = {tuple(s): tvm.runtime.tensor(np.zeros(s, dtype), self.device) for s in shapes}
        return [shared[tuple(s)] for s in shapes]

    def tensor(self, array: np.ndarray):
        return tvm.runtime.tensor(array, self.device)

    def shape(self, n: int):
        return tvm.runtime.ShapeTuple([n])

    def first(self, outputs) -> np.ndarray:
        return self.item(outputs, 0)

    def item(self, outputs, i: int) -> np.ndarray:
        return outputs[i].numpy()


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ElastiLMError(f"endpoint must be host:port, got '{text}'")
    return host or "127.0.0.1", int(port)


DEFAULT_TIMEOUT = 60.0  # seconds one RPC call may wait for the device before it counts as lost
DEFAULT_RECONNECT = 30.0  # seconds a lost device is reconnected to, with back-off (a rebooting phone)
FIRST_CONNECT = 3.0  # seconds the first connection is tried for (a wrong address fails fast)
HANDSHAKE = 10.0  # seconds a connection's handshake may take (milliseconds when the device answers)


def _socket(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of descriptor `fd` (closing it leaves `fd` open), or None if `fd` is not a
    socket (or is closed)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None


def _tcp_sockets() -> dict[int, tuple]:
    """This process's TCP sockets: fd -> (local address, peer address or None for a listener)."""
    found = {}
    for name in os.listdir("/dev/fd"):
        sock = _socket(int(name))
        if sock is None:
            continue
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                local = sock.getsockname()
                peer = None if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) else sock.getpeername()
            except OSError:
                continue
            found[int(name)] = (local, peer)
    return found


def _opened_links(before: dict[int, tuple]) -> list[int]:
    """The outgoing TCP connections opened since `before`: not listeners, not connections a server of this process
    accepted or was sent (a service's clients)."""
    now = _tcp_sockets()
    ports = {local[1] for local, peer in now.values() if peer is None}
    return [
        fd
        for fd, (local, peer) in now.items()
        if before.get(fd) != (local, peer) and peer is not None and local[1] not in ports and peer[1] not in ports
    ]


def _shutdown(sock: socket.socket | None) -> None:
    """End the connection (the other side sees it closed, blocked calls on it return) and close `sock`."""
    if sock is not None:
        with sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class RemoteSession:
    """A device reached through an RPC server (`rpc=host:port`) or a tracker (`tracker=host:port`, `key`).

    TVM's RPC client has no deadlines, so a stopped device or a half-open link would block a call for ever. Each
    connection's socket (found among this process's descriptors: the one outgoing TCP connection the connect
    opened) gets receive and send timeouts of `timeout` seconds: a call that waits longer fails, the link is shut
    down (which also ends the session on the device, so the server takes the next one) and DeviceLost names the
    endpoint. `connect` retries with back-off for `reconnect_for` seconds, then gives up with DeviceLost. `timeout`
    must exceed the longest single call: a prefill chunk, loading the weights on the device (the qemu stand-in
    phone needs minutes)."""

    def __init__(
        self,
        rpc: str | None = None,
        tracker: str | None = None,
        key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        reconnect_for: float = DEFAULT_RECONNECT,
        progress: bool = True,
    ):
        if (rpc is None) == (tracker is None):
            raise ElastiLMError("give either rpc=host:port or tracker=host:port with key=NAME")
        if tracker is not None and not key:
            raise ElastiLMError("a tracker needs the device key (key=NAME)")
        if not timeout > 0 or not reconnect_for >= 0:
            raise ElastiLMError(f"the RPC timeout must be > 0 and reconnect_for >= 0, got {timeout}, {reconnect_for}")
        self.rpc, self.tracker, self.key = rpc, tracker, key
        self.endpoint = f"rpc {rpc}" if rpc else f"tracker {tracker} key '{key}'"
        self.timeout, self.reconnect_for, self.progress = timeout, reconnect_for, progress
        self.uploaded_bytes = 0
        self.connections = 0  # connects so far: handles made under an earlier connection are stale
        self._link = None  # the connection's socket (a duplicate of TVM's descriptor, so it stays ours)
        self.connect(FIRST_CONNECT)

    # -- connection ---------------------------------------------------------------------------------------
    def connect(self, within: float | None = None) -> None:
        """(Re)connect, retrying with back-off (0.25 s, doubling up to 4 s) for `within` seconds (default
        reconnect_for); DeviceLost when the device cannot be reached in that time."""
        self._drop_link()
        give_up = time.monotonic() + (self.reconnect_for if within is None else within)
        pause, tries = 0.25, 0
        while True:
            tries += 1
            try:
                self.remote, self._link = self._open()
                break
            except (OSError, RuntimeError) as err:
                last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            if time.monotonic() + pause > give_up:
                raise DeviceLost(f"cannot reach the device at {self.endpoint} ({tries} tries): {last}")
            time.sleep(pause)
            pause = min(2 * pause, 4.0)
        if self._link is not None:
            timeval = struct.pack("ll", int(self.timeout), int(self.timeout % 1 * 1e6))
            self._link.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self._link.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.connections += 1
        if hasattr(self, "device_type"):  # a reconnect: the device handle belongs to the new link
            self.device = self.remote.device(self.device_type)

    def _open(self):
        """A new RPC session and its socket (None if it cannot be told apart: no deadlines then), in a thread
        that is given HANDSHAKE seconds: a stopped device accepts the connection and never answers its
        handshake, so the sockets it opened are then shut down, which ends the wait."""
        from tvm import rpc

        def open_session():
            if self.rpc:
                return rpc.connect(*parse_endpoint(self.rpc), session_timeout=0)
            tracker = rpc.connect_tracker(*parse_endpoint(self.tracker))
            try:
                return tracker.request(self.key, session_timeout=0)
            finally:
                tracker.close()

        before, result = _tcp_sockets(), {}

        def run():
            try:
                result["session"] = open_session()
            except Exception as err:  # noqa: BLE001  (re-raised in the caller's thread)
                result["error"] = err

        thread = threading.Thread(target=run, name="elastilm-rpc-connect", daemon=True)
        thread.start()
        thread.join(min(self.timeout, HANDSHAKE))
        links = _opened_links(before)
        if thread.is_alive():
            for fd in links:
                _shutdown(_socket(fd))
            thread.join(5)
            raise TimeoutError(f"no answer to the handshake within {min(self.timeout, HANDSHAKE):g} s")
        if "error" in result:
            raise result["error"]
        if len(links) != 1:
            LOG.warning("cannot tell the socket to %s apart: its calls have no deadline", self.endpoint)
            return result["session"], None
        return result["session"], _socket(links[0])

    def _drop_link(self) -> None:
        """Shut the current connection down: its stale handles fail at once, and the device's session ends."""
        _shutdown(self._link)
        self._link = None

    def close(self) -> None:
        self._drop_link()
        self._shape = self._get_item = self.remote = self.device = None

    @contextlib.contextmanager
    def guard(self):
        """A broken or stalled connection inside becomes DeviceLost, naming the endpoint."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if "temporarily unavailable" in str(err):  # EAGAIN: the socket's timeout passed without an answer
                self._drop_link()
                raise DeviceLost(f"the device at {self.endpoint} gave no answer within {self.timeout:g} s") from err
            if not self._alive():  # RPC errors of a lost link vary with where the call was cut; ask the link
                self._drop_link()
                raise DeviceLost(f"lost the device at {self.endpoint}: {str(err).strip().splitlines()[-1]}") from err
            raise

    def _alive(self) -> bool:
        try:
            self.remote.get_function("ffi.Shape")
            return True
        except (OSError, RuntimeError):
            return False

    def call(self, fn, *args):
        with self.guard():
            return fn(*args)

    def function(self, name: str, required: bool = True):
        try:
            return self.remote.get_function(name)
        except (AttributeError, RuntimeError):
            if required:
                raise ElastiLMError(f"the device at {self.endpoint} has no function '{name}'") from None
            return None

    # -- staging and loading ------------------------------------------------------------------------------
    def _stage(self, folder: Path, manifest: dict) -> tuple[str, str]:
        """Put the library and weights on the device; returns their (library path, params folder) there.
        With elastilm's device server they are cached across sessions by the manifest's hash."""
        files = [manifest["library"]] + sorted(f for f in manifest["files"] if f.startswith("params/"))
        key = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:32]
        has, commit, path = (self.function(f"elastilm.device.{n}", required=False) for n in ("has", "commit", "path"))
        if has is None:  # a stock TVM RPC server: files go to its session folder, names without folders
            if getattr(self, "_staged", key) != key:
                raise ElastiLMError(
                    f"the device at {self.endpoint} is a stock TVM RPC server, where a second build's "
                    "files would overwrite the first's; run `elastilm device serve` there"
                )
            self._staged = key
            for f in self._progress(files, "upload (device has no cache)"):
                self.call(self.remote.upload, str(folder / f), Path(f).name)
                self.uploaded_bytes += (folder / f).stat().st_size
            workdir = self.call(self.function("tvm.rpc.server.workpath"), "")
            return str(Path(workdir) / Path(manifest["library"]).name), workdir
        missing = [f for f in files if not has(key, f, (folder / f).stat().st_size, manifest["files"][f])]
        for f in self._progress(missing, "upload"):
            self.call(self.remote.upload, str(folder / f), "incoming")
            self.call(commit, "incoming", key, f, manifest["files"][f])
            self.uploaded_bytes += (folder / f).stat().st_size
        return path(key, manifest["library"]), path(key, "params")

    def _progress(self, items, desc):
        if not self.progress or not items:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="file")

    def load(self, folder: Path, manifest: dict):
        library, params_dir = self._stage(folder, manifest)
        if isinstance(manifest["target"], dict):  # an LLM build names its device; a TLM build runs beside it
            self.device_type = tvm.device(manifest["target"].get("device", "cpu")).dlpack_device_type()
            self.device = self.remote.device(self.device_type)
        lib = self.call(self.remote.load_module, library)
        vm = VirtualMachine(lib, self.device)
        # looked up once: each lookup is a round trip, and these run for every token
        self._shape, self._get_item = self.function("ffi.Shape"), self.function("ffi.ArrayGetItem")
        self.call(self.function("vm.builtin.tensor_cache.load"), params_dir, self.device_type, 0)
        return vm

    def arrays(self, names: list[str]):
        """Tensors of the device's tensor cache, in order, as one device-side array."""
        return self.call(self.function("vm.builtin.param_array_from_cache_by_name_unpacked"), *names)

    def zeros(self, shapes: list[tuple[int, ...]], tag: str, dtype: str = "float32"):
        """Zeroed tensors allocated on the device, as one device-side array; equal shapes share one tensor
        unless `tag` is "kv" (each KV cache is written in place)."""
        update = self.function("vm.builtin.tensor_cache.update")
        names = []
        for i, s in enumerate(shapes):
            name = CACHE_NAME.format(tag, i if tag == "kv" else "x".join(map(str, s)))
            if name not in names:
                self.call(update, name, self.call(tvm.runtime.tensor, np.zeros(s, dtype), self.device), True)
            names.append(name)
        return self.arrays(names)

    def tensor(self, array: np.ndarray):
        return self.call(tvm.runtime.tensor, array, self.device)

    def shape(self, n: int):
        return self.call(self._shape, n)

    def tensors(self, names: list[str]) -> list:
        """Tensors of the device's tensor cache, one handle each."""
        get = self.function("vm.builtin.tensor_cache.get")
        return [self.call(get, n) for n in names]

    def first(self, outputs) -> np.ndarray:
        return self.item(outputs, 0)

    def item(self, outputs, i: int) -> np.ndarray:
        return self.call(self._get_item, outputs, i).numpy()


class DeviceLost(ElastiLMError):
    """The device cannot be reached, stopped answering, or its connection broke; the message names the endpoint."""
