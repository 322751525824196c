"""Guest-side fuzzing (scripts/fuzz.py) against a running daemon, bounded; and the same fuzzer
in-process over a data plane built with AddressSanitizer.

scripts/fuzz.py's oracles: every chain completes (with an error status when it is malformed) or
the ring is marked broken and serves again after a reset; used.len never exceeds the writable
bytes; the device writes guest memory only inside writable buffers; another controller of the same
daemon keeps serving through the project's front-end.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from tests.fuzz.conftest import SOAK
from tests.fuzz.vhost_peer import fd_count, guest_mappings
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
    baseline = fd_count(pid), guest_mappings(pid)
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
    deadline = time.monotonic() + 10
    # At most the baseline: that one may include an RPC connection the daemon was still closing.
    while fd_count(pid) > baseline[0] or guest_mappings(pid) > baseline[1]:
        assert time.monotonic() < deadline, "fds/mappings %r, baseline %r" % (
            (fd_count(pid), guest_mappings(pid)), baseline)
        time.sleep(0.01)


# -- AddressSanitizer -------------------------------------------------------------------------
def _asan_runtime() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    for compiler in (cc, "gcc", "cc"):
        path = shutil.which(compiler)
        if path is None:
            continue
        out = subprocess.run([path, "-print-file-name=libasan.so"], capture_output=True, text=True)
        lib = out.stdout.strip()
        if out.returncode == 0 and os.path.isabs(lib) and os.path.exists(lib):
            return os.path.realpath(lib)
    return None


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "ext").glob("*")) + [REPO_ROOT / "setup.py"]:
        if path.suffix in (".pyx", ".pxi", ".pxd", ".py"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def build_asan_tree() -> Path:
    """A copy of the package with the extension built with VHOSTD_ASAN=1, in a temporary
    directory keyed by the extension's sources (built once per version of them).  Built aside and
    renamed into place, so concurrent runs (other checkouts too) never see a half-built tree."""
    root = Path("/tmp") / ("vhostd-asan-%s" % _source_hash())
    if (root / ".built").exists():
        return root
    work = Path(tempfile.mkdtemp(prefix="vhostd-asan-build-", dir="/tmp"))
    try:
        shutil.copytree(REPO_ROOT / "vhostd", work / "vhostd",
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        shutil.copytree(REPO_ROOT / "ext", work / "ext", ignore=shutil.ignore_patterns("*.c", "*.so"))
        shutil.copy2(REPO_ROOT / "setup.py", work / "setup.py")
        (work / "scripts").mkdir()
        env = dict(os.environ, VHOSTD_ASAN="1")
        result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=work,
                                env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError("ASAN build failed:\n" + result.stdout[-3000:] + result.stderr[-3000:])
        (work / ".built").write_text("ok\n")
        try:
            os.rename(work, root)
        except OSError:
            if not (root / ".built").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def test_guest_fuzzer_in_process_under_address_sanitizer():
    libasan = _asan_runtime()
    if libasan is None:
        pytest.skip("no libasan.so for the compiler that builds the extension")
    root = build_asan_tree()
    so = list((root / "vhostd").glob("_dataplane*.so"))
    assert so, "the ASAN build produced no extension"
    nm = subprocess.run(["nm", "-D", str(so[0])], capture_output=True, text=True)
    assert "__asan" in nm.stdout, "the extension is not instrumented"
    shutil.copy2(FUZZ_SCRIPT, root / "scripts" / "fuzz.py")
    env = dict(os.environ, PYTHONPATH=str(root), LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1")
    env.pop("PYTHONHOME", None)
    iterations = "5000" if SOAK else "300"
    result = subprocess.run([sys.executable, str(root / "scripts" / "fuzz.py"), "--target", "inproc",
                             "--iterations", iterations, "--seed", "23", "--scribble-inflight",
                             "--max-seconds", "600" if SOAK else "15", "--timeout", "10"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    print(output[-4000:])
    findings = [line for line in output.splitlines() if "FINDING" in line or "Error" in line]
    assert "AddressSanitizer" not in output, output[-8000:]
    assert result.returncode == 0, "\n".join(findings) + "\n" + output[-3000:]
    assert "findings 0" in result.stdout, "\n".join(findings)
