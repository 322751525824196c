"""Fixtures: ``daemon(*args, **kw)`` starts a real vhostd (tests.helpers.daemon.Daemon) and stops
it at teardown, printing its log when a test fails."""

import pytest

from tests.helpers.daemon import Daemon


@pytest.fixture
def daemon(request):
    daemons = []

    def start(*args, start=True, **kw):
        d = Daemon(*args, **kw)
        daemons.append(d)
        if start:
            d.start()
        return d

    yield start
    for d in daemons:
        d.stop()
        if getattr(request.node, "rep_call_failed", False):
            print(d.log())
        d.cleanup()
