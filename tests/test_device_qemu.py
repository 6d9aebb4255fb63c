"""The stand-in phone: the linux-arm64-cpu build on Debian arm64 Python + the aarch64 TVM wheel under qemu,
driven over RPC. Run by `make test-device`, which builds the phone first (scripts/qemu-phone/setup.sh)."""

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import elastified_tiny

from elastilm.compile.build import build
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.runtime_py.session import DeviceLost, RemoteSession

pytestmark = pytest.mark.device
REPO = Path(__file__).resolve().parents[1]
PHONE = Path(os.environ.get("QEMU_PHONE_DIR", REPO / ".qemu-phone"))


@pytest.fixture(scope="module")
def phone(tmp_path_factory):
    if not (PHONE / ".smoke-done").is_file():
        if os.environ.get("ELASTILM_REQUIRE_QEMU") == "1":
            pytest.fail(f"no stand-in phone in {PHONE}: run scripts/qemu-phone/setup.sh")
        pytest.skip("no stand-in phone (scripts/qemu-phone/setup.sh)")
    # The server's output goes to a file, not a pipe: a pipe nobody drains would block the server once full.
    log = tmp_path_factory.mktemp("phone") / "serve.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [str(REPO / "scripts/qemu-phone/serve.sh"), "9600"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 120
        while "RPC server ready on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the stand-in phone did not start:\n{log.read_text()}")
            time.sleep(0.5)
        endpoint = "127.0.0.1:9600"
        try:  # one whole session before the tests, so a phone that accepts but never serves fails here, by name
            RemoteSession(endpoint).close()
        except DeviceLost as err:
            pytest.fail(f"the stand-in phone does not serve sessions ({err}); its log:\n{log.read_text()}")
        yield endpoint, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["q0f32", "q4f32_mix"])
def builds(request, tmp_path_factory):
    """(host build, linux-arm64 build, scheme) of one tiny model; quantized ones need widths of whole groups."""
    scheme = request.param
    if scheme == "q0f32":
        out = elastified_tiny(tmp_path_factory, "llama")
    else:
        out = elastified_tiny(tmp_path_factory, "llama-grouped", neuron_multiple=32)
    made = [
        build(out, target, tmp_path_factory.mktemp(target) / scheme, max_len=40, quantization=scheme)
        for target in ("host-cpu", "linux-arm64-cpu")
    ]
    return *made, scheme


def test_arm64_build_on_the_phone_matches_the_host(phone, builds):
    (endpoint, log), (host_build, arm_build, scheme) = phone, builds
    local = ElasticEngine(host_build, quant=scheme)
    try:
        remote = ElasticEngine(arm_build, rpc=endpoint, quant=scheme)
    except DeviceLost as err:
        pytest.fail(f"{err}; the stand-in phone's log:\n{log.read_text()}")
    ids = np.random.default_rng(2).integers(0, local.elastic["config"]["vocab_size"], 9).tolist()
    try:
        for level in (1.0, 0.5, 0.2):  # NEON vs AVX-512 sum in different orders: close, not bit-equal
            np.testing.assert_allclose(remote.prefill(ids, level), local.prefill(ids, level), rtol=1e-4, atol=1e-4)
            assert list(remote.generate_ids(ids, level, 8)) == list(local.generate_ids(ids, level, 8))
    finally:
        remote.close()
