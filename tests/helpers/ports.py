"""A free TCP port on loopback, for servers a test starts (HTTP endpoints, QMP, Ceph monitors)."""

from __future__ import annotations

import socket


def free_tcp_port() -> int:
    """A port nothing listens on right now (the kernel's pick; free until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
