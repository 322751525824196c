"""Guest-side fuzzing (scripts/fuzz.py) against a running daemon, bounded; and the same fuzzer
in-process over a data plane built with AddressSanitizer.

scripts/fuzz.py's oracles: every chain completes (with an error status when it is malformed) or
the ring is marked broken and serves again after a reset; used.len never exceeds the writable
bytes; the device writes guest memory only inside writable buffers; another controller of the same
daemon keeps serving through the project's front-end.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time

import pytest

from tests.fuzz.conftest import SOAK
from tests.fuzz.vhost_peer import resources, wait_back_to
from tests.helpers.asan import asan_runtime, build_asan_tree, run_under_asan
from tests.helpers.daemon import REPO_ROOT, Daemon

FUZZ_SCRIPT = REPO_ROOT / "scripts" / "fuzz.py"


def load_fuzz():
    spec = importlib.util.spec_from_file_location("vhostd_guest_fuzz", FUZZ_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while executing
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def daemon_with_two_controllers():
    d = Daemon()
    d.start()
    try:
        d.rpc("bdev_malloc_create", name="Fz0", num_blocks=32768, block_size=512)
        d.rpc("bdev_malloc_create", name="Fz1", num_blocks=8192, block_size=512)
        d.rpc("vhost_create_blk_controller", ctrlr="fuzz.0", dev_name="Fz0")
        d.rpc("vhost_create_blk_controller", ctrlr="good.0", dev_name="Fz1")
        yield d
    finally:
        d.stop()
        d.cleanup()


def idle(d: Daemon) -> bool:
    return not any(c["sessions"] for c in d.rpc("vhost_get_controllers"))


def wait_idle(d: Daemon, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not idle(d):
        assert time.monotonic() < deadline, "a controller still holds a session"
        time.sleep(0.01)


@pytest.mark.parametrize("scribble", [False, True], ids=["chains", "chains+inflight-scribbler"])
def test_adversarial_descriptor_chains_complete_with_errors_or_break_the_ring(daemon_with_two_controllers,
                                                                            scribble):
    d = daemon_with_two_controllers
    fuzz = load_fuzz()
    wait_idle(d)
    pid = d.proc.pid
    baseline = resources(pid)
    iterations = 20000 if SOAK else (250 if scribble else 400)
    report = fuzz.fuzz(str(d.socket_dir / "fuzz.0"), str(d.socket_dir / "good.0"), iterations,
                       seed=11 if scribble else 5, scribble_inflight=scribble,
                       deadline_s=None if SOAK else 25)
    print(report.summary())
    assert not report.findings, "\n".join(report.findings[:20])
    assert report.iterations >= 50 and report.good_checks >= 1
    # Every kind of hostile chain was tried, and the structural ones did break the ring.
    assert set(report.tried) == set(fuzz.CASES)
    assert report.outcomes["loop:broken"] and report.outcomes["avail_jump:broken"]
    assert report.resets > 0
    assert d.proc.poll() is None
    assert "Traceback" not in d.log()
    wait_idle(d)
    wait_back_to(pid, baseline)


# -- AddressSanitizer -------------------------------------------------------------------------
def test_guest_fuzzer_in_process_under_address_sanitizer():
    libasan = asan_runtime()
    if libasan is None:
        pytest.skip("no libasan.so for the compiler that builds the extension")
    root = build_asan_tree()
    shutil.copy2(FUZZ_SCRIPT, root / "scripts" / "fuzz.py")
    iterations = "5000" if SOAK else "300"
    result = run_under_asan(root, libasan, [str(root / "scripts" / "fuzz.py"), "--target", "inproc",
                                            "--iterations", iterations, "--seed", "23", "--scribble-inflight",
                                            "--max-seconds", "600" if SOAK else "15", "--timeout", "10"],
                            timeout_s=1800)
    output = result.stdout + result.stderr
    print(output[-4000:])
    findings = [line for line in output.splitlines() if "FINDING" in line or "Error" in line]
    assert "AddressSanitizer" not in output, output[-8000:]
    assert result.returncode == 0, "\n".join(findings) + "\n" + output[-3000:]
    assert "findings 0" in result.stdout, "\n".join(findings)
