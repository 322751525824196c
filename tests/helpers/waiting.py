"""Polling for a condition with a deadline (tests that wait on another thread or process)."""

import time


def wait_for(predicate, timeout=5.0, interval=0.0005):
    """Call predicate until it returns true; TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met within %.1f s" % timeout)
        time.sleep(interval)
