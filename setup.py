"""Build of the data-plane extension; compiler flags live here and nowhere else.

One compiled module, ``vhostd._dataplane``, built from ``ext/_dataplane.pyx`` which includes the
parts (``ext/*.pxi``).  ``VHOSTD_ASAN=1`` builds it with AddressSanitizer for the fuzz tests, ``VHOSTD_PROFILE=1`` without
inlining for per-function instruction counts.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CFLAGS = ["-O2", "-g", "-fno-strict-aliasing", "-Wno-unused-function", "-Wno-unreachable-code"]
LDFLAGS = []
if os.environ.get("VHOSTD_PROFILE") == "1":
    # Per-function instruction counts (scripts/profile_request.py): nothing inlined.
    CFLAGS += ["-fno-inline", "-fno-inline-functions", "-fno-inline-small-functions"]
if os.environ.get("VHOSTD_ASAN") == "1":
    CFLAGS += ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"]
    LDFLAGS += ["-fsanitize=address"]

dataplane = Extension(
    "vhostd._dataplane",
    sources=["ext/_dataplane.pyx"],
    include_dirs=["ext"],
    libraries=["uring"],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
)

setup(
    ext_modules=cythonize(
        [dataplane],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
        include_path=["ext"],
    ),
)
