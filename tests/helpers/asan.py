"""The data plane built with AddressSanitizer, for the fuzzers: a copy of the package whose
extension is instrumented, and a way to run a command against it with the ASAN runtime loaded."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from tests.helpers.daemon import REPO_ROOT

ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"


def asan_runtime() -> str | None:
    """The libasan.so of the compiler that builds the extension, or None."""
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
    directory keyed by the extension's sources (built once per version of them; the Python
    package is refreshed from the checkout on every use).  Built aside and renamed into place, so
    concurrent runs (other checkouts too) never see a half-built tree."""
    root = Path("/tmp") / ("vhostd-asan-%s" % _source_hash())
    if (root / ".built").exists():
        _sync_python(root)
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


def _sync_python(root: Path) -> None:
    """The tree is keyed by the extension's sources only: bring its Python package up to date
    with the checkout's (the instrumented extension stays)."""
    shutil.copytree(REPO_ROOT / "vhostd", root / "vhostd", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def run_under_asan(root: Path, libasan: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `python args...` in the instrumented tree root (from build_asan_tree(): its cwd and
    first import path, so vhostd is the ASAN build), with the runtime preloaded.  Fails the test
    if the extension is not instrumented; the caller checks the output for "AddressSanitizer"."""
    so = list((root / "vhostd").glob("_dataplane*.so"))
    assert so, "the ASAN build produced no extension"
    nm = subprocess.run(["nm", "-D", str(so[0])], capture_output=True, text=True)
    assert "__asan" in nm.stdout, "the extension is not instrumented"
    env = dict(os.environ, PYTHONPATH=str(root), LD_PRELOAD=libasan, ASAN_OPTIONS=ASAN_OPTIONS)
    env.pop("PYTHONHOME", None)
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
