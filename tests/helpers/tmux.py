"""A program on a real terminal: tmux runs it on a detached pane of a given size; the test types
keys into it and reads the screen back as text."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Callable

from tests.helpers.waiting import wait_for


class TmuxScreen:
    def __init__(self, workdir: Path, width: int = 132, height: int = 40) -> None:
        self.server = str(workdir / "tmux.sock")
        self.width, self.height = width, height
        self.session = "screen"

    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-S", self.server, *args], capture_output=True, text=True,
                              check=check, timeout=20)

    def start(self, command: list[str], env: dict[str, str] | None = None) -> None:
        exports = " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in (env or {}).items())
        line = ("env %s " % exports if exports else "") + shlex.join(command)
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", self.session, "-x", str(self.width),
                   "-y", str(self.height), line)
        self._tmux("set-option", "-t", self.session, "remain-on-exit", "on")

    def text(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.session).stdout

    def press(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def exited(self) -> bool:
        """The program has ended (its pane stays, with remain-on-exit, for its last screen)."""
        result = self._tmux("display-message", "-p", "-t", self.session, "#{pane_dead}", check=False)
        return result.returncode != 0 or result.stdout.strip() == "1"

    def wait_for(self, holds: Callable[[str], bool], what: str, timeout_s: float = 30.0) -> str:
        """The screen once ``holds(screen)``; AssertionError with the last screen if it never does."""
        screen = [""]

        def shown() -> bool:
            screen[0] = self.text()
            return holds(screen[0])

        try:
            wait_for(shown, timeout=timeout_s, interval=0.2)
        except TimeoutError:
            raise AssertionError("%s: not on the screen within %.0f s:\n%s" % (what, timeout_s, screen[0])) from None
        return screen[0]

    def close(self) -> None:
        self._tmux("kill-server", check=False)
