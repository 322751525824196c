"""A well-behaved client kept busy in a thread while a fuzz case attacks another controller."""

from __future__ import annotations

import threading
import time


class BackgroundTraffic:
    """Runs ``step()`` every 2 ms in a thread until closed; ``check()`` asserts it still makes
    progress.  Subclasses open their client before calling ``start()`` and release it in
    ``release()``."""

    name = "good"

    def start(self) -> None:
        self.done = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def step(self, n: int) -> None:
        raise NotImplementedError

    def release(self) -> None:
        pass

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.step(self.done)
                self.done += 1
                time.sleep(0.002)
        except BaseException as exc:           # reported by check()
            self.error = exc

    def check(self, timeout_s: float = 10.0) -> None:
        """Still serving: no error, and more requests complete."""
        start = self.done
        deadline = time.monotonic() + timeout_s
        while self.done < start + 2:
            assert self.error is None, "%s failed: %r" % (self.name, self.error)
            assert time.monotonic() < deadline, "%s made no progress" % self.name
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.release()
