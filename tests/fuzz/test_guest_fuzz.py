"""Guest-side fuzzing (scripts/fuzz.py) against a running daemon, bounded; and the same fuzzer
in-process over a data plane built with AddressSanitizer.

scripts/fuzz.py's oracles: every chain completes (with an error status when it is malformed) or
the ring is marked broken and serves again after a reset; used.len never exceeds the writable
bytes; the device writes guest memory only inside writable buffers; another controller of the same
daemon keeps serving through the project's front-end.  Both ring layouts: split, and packed on
a controller created with packed_ring.
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
        d.rpc("bdev_malloc_create", name="FzP", num_blocks=32768, block_size=512)
        d.rpc("vhost_create_blk_controller", ctrlr="fuzzp.0", dev_name="FzP", packed_ring=True)
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


def fuzz_controller(d: Daemon, ctrlr: str, seed: int, scribble: bool, packed: bool):
    """Run the guest fuzzer on one controller of d; its common oracles checked (no findings, the
    other controller served, every case tried, the daemon alive and back to its fds and maps).
    Returns the fuzz module and the report for the ring-specific checks."""
    fuzz = load_fuzz()
    wait_idle(d)
    pid = d.proc.pid
    baseline = resources(pid)
    iterations = 20000 if SOAK else (250 if scribble else 400)
    report = fuzz.fuzz(str(d.socket_dir / ctrlr), str(d.socket_dir / "good.0"), iterations,
                       seed=seed, scribble_inflight=scribble, deadline_s=None if SOAK else 25, packed=packed)
    print(report.summary())
    assert not report.findings, "\n".join(report.findings[:20])
    assert report.iterations >= 50 and report.good_checks >= 1
    assert set(report.tried) == set(fuzz.PACKED_CASES if packed else fuzz.CASES)
    assert report.resets > 0
    assert d.proc.poll() is None
    assert "Traceback" not in d.log()
    wait_idle(d)
    wait_back_to(pid, baseline)
    return fuzz, report


@pytest.mark.parametrize("scribble", [False, True], ids=["chains", "chains+inflight-scribbler"])
def test_adversarial_descriptor_chains_complete_with_errors_or_break_the_ring(daemon_with_two_controllers,
                                                                            scribble):
    _, report = fuzz_controller(daemon_with_two_controllers, "fuzz.0", 11 if scribble else 5, scribble, False)
    # The structural cases did break the ring.
    assert report.outcomes["loop:broken"] and report.outcomes["avail_jump:broken"]


@pytest.mark.parametrize("scribble", [False, True], ids=["chains", "chains+inflight-scribbler"])
def test_adversarial_packed_rings_complete_with_errors_or_break_the_ring(daemon_with_two_controllers, scribble):
    """The same oracles on a packed ring: chains longer than the ring and buffer ids out of range
    break it, bad buffers and tables fail their request, valid requests succeed."""
    _, report = fuzz_controller(daemon_with_two_controllers, "fuzzp.0", 13 if scribble else 7, scribble, True)
    assert report.outcomes["chain_too_long:broken"] and report.outcomes["id_out_of_range:broken"]
    assert report.outcomes["valid:ok"]


# -- AddressSanitizer -------------------------------------------------------------------------
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_guest_fuzzer_in_process_under_address_sanitizer(ring):
    libasan = asan_runtime()
    if libasan is None:
        pytest.skip("no libasan.so for the compiler that builds the extension")
    root = build_asan_tree()
    shutil.copy2(FUZZ_SCRIPT, root / "scripts" / "fuzz.py")
    iterations = "5000" if SOAK else "300"
    result = run_under_asan(root, libasan, [str(root / "scripts" / "fuzz.py"), "--target", "inproc",
                                            "--iterations", iterations, "--seed", "23", "--scribble-inflight",
                                            "--max-seconds", "600" if SOAK else "15", "--timeout", "10"]
                            + (["--packed"] if ring == "packed" else []),
                            timeout_s=1800)
    output = result.stdout + result.stderr
    print(output[-4000:])
    findings = [line for line in output.splitlines() if "FINDING" in line or "Error" in line]
    assert "AddressSanitizer" not in output, output[-8000:]
    assert result.returncode == 0, "\n".join(findings) + "\n" + output[-3000:]
    assert "findings 0" in result.stdout, "\n".join(findings)
