"""Fuzz tests: a real vhostd per module, bounded example counts by default and larger ones with
``VHOSTD_FUZZ_SOAK=1`` (the soak run of docs/security.md)."""

from __future__ import annotations

import os

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.ports import free_tcp_port

SOAK = os.environ.get("VHOSTD_FUZZ_SOAK") == "1"


def examples(default: int, soak: int) -> int:
    """Hypothesis max_examples: bounded for the normal run, larger for a soak."""
    return soak if SOAK else default


@pytest.fixture(scope="module")
def fuzz_daemon(request):
    """A running vhostd with the HTTP endpoint on a free loopback port (``.http_url``)."""
    port = free_tcp_port()
    d = Daemon("--http", "127.0.0.1:%d" % port)
    d.http_url = "http://127.0.0.1:%d/" % port
    d.http_port = port
    d.start()
    yield d
    d.stop()
    if any(getattr(item, "rep_call_failed", False) for item in request.session.items
           if item.module is request.module):
        print(d.log()[-20000:])
    d.cleanup()
