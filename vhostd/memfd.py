"""Shared memory a peer hands over: make sure it cannot shrink under our mapping."""

from __future__ import annotations

import fcntl


def fix_size(fd: int, what: str) -> None:
    """Seal a peer's memfd against resizing, or find it sealed: a file shrunk under our mapping
    would fault (SIGBUS) on the next access.  ValueError if it can be resized (not a memfd, or one
    that neither allows sealing nor is sealed); ``what`` names the fd in the message."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        pass
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ValueError("the %s could be shrunk under our mapping (not a sealed memfd)" % what)
