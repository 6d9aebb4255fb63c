"""Where a build runs: in this process, or on a device over TVM RPC. The engine sees the same five operations.

Over RPC, containers cannot be sent from the client (only tensors, scalars and strings): shape tuples are made
by the device's `ffi.Shape`, and the parameter and KV-cache arrays are made on the device from its tensor cache
(`vm.builtin.tensor_cache.*`, part of every TVM runtime). Weights are loaded by the device from its own storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from elastilm.formats.errors import ElastiLMError

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

        vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / manifest["library"])), self.device)
        tensors, _ = load_tensor_cache(str(folder / "params"), self.device)
        self._tensors = {**getattr(self, "_tensors", {}), **tensors}  # a second build (the TLM) adds its own
        return vm

    def arrays(self, names: list[str]):
        """The loaded tensors `names`, in order, as one argument."""
        return [self._tensors[n] for n in names]

    def tensors(self, names: list[str]) -> list:
        """The loaded tensors `names`, one argument each."""
        return self.arrays(names)

    def zeros(self, shapes: list[tuple[int, int]], tag: str):
        """Zeroed tensors of `shapes` as one argument; equal shapes share one tensor unless `tag` is "kv"
        (each KV cache is written in place)."""
        if tag == "kv":
            return [tvm.runtime.tensor(np.zeros(s, "float32"), self.device) for s in shapes]
        shared = {tuple(s): tvm.runtime.tensor(np.zeros(s, "float32"), self.device) for s in shapes}
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


class RemoteSession:
    """A device reached through an RPC server (`rpc=host:port`) or a tracker (`tracker=host:port`, `key`)."""

    def __init__(
        self,
        rpc: str | None = None,
        tracker: str | None = None,
        key: str | None = None,
        retries: int = 3,
        progress: bool = True,
    ):
        if (rpc is None) == (tracker is None):
            raise ElastiLMError("give either rpc=host:port or tracker=host:port with key=NAME")
        if tracker is not None and not key:
            raise ElastiLMError("a tracker needs the device key (key=NAME)")
        self.rpc, self.tracker, self.key = rpc, tracker, key
        self.endpoint = f"rpc {rpc}" if rpc else f"tracker {tracker} key '{key}'"
        self.retries, self.progress = retries, progress
        self.uploaded_bytes = 0
        self.connections = 0  # connects so far: handles made under an earlier connection are stale
        self.connect()

    # -- connection ---------------------------------------------------------------------------------------
    def connect(self) -> None:
        from tvm import rpc

        last = None
        for attempt in range(self.retries):
            try:
                if self.rpc:
                    self.remote = rpc.connect(*parse_endpoint(self.rpc), session_timeout=0)
                else:
                    self.remote = rpc.connect_tracker(*parse_endpoint(self.tracker)).request(
                        self.key, session_timeout=0
                    )
                self.connections += 1
                if hasattr(self, "device_type"):  # a reconnect: the device handle belongs to the new link
                    self.device = self.remote.device(self.device_type)
                return
            except (OSError, RuntimeError) as err:
                last = err
                time.sleep(0.5 * (attempt + 1))
        raise ElastiLMError(f"cannot reach the device at {self.endpoint} after {self.retries} tries: {last}")

    def close(self) -> None:
        self._shape = self._get_item = self.remote = self.device = None

    @contextlib.contextmanager
    def guard(self):
        """A broken connection inside becomes DeviceLost, naming the endpoint."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if not self._alive():  # RPC errors of a lost link vary with where the call was cut; ask the link
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
        vm = relax.VirtualMachine(lib, self.device)
        # looked up once: each lookup is a round trip, and these run for every token
        self._shape, self._get_item = self.function("ffi.Shape"), self.function("ffi.ArrayGetItem")
        self.call(self.function("vm.builtin.tensor_cache.load"), params_dir, self.device_type, 0)
        return vm

    def arrays(self, names: list[str]):
        """Tensors of the device's tensor cache, in order, as one device-side array."""
        return self.call(self.function("vm.builtin.param_array_from_cache_by_name_unpacked"), *names)

    def zeros(self, shapes: list[tuple[int, int]], tag: str):
        """Zeroed tensors allocated on the device, as one device-side array; equal shapes share one tensor
        unless `tag` is "kv" (each KV cache is written in place)."""
        update = self.function("vm.builtin.tensor_cache.update")
        names = []
        for i, s in enumerate(shapes):
            name = CACHE_NAME.format(tag, i if tag == "kv" else "x".join(map(str, s)))
            if name not in names:
                self.call(update, name, self.call(tvm.runtime.tensor, np.zeros(s, "float32"), self.device), True)
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
    """The RPC connection broke; the message names the endpoint."""
