"""Logging with SPDK's level names: ERROR, WARNING, NOTICE, INFO, DEBUG.

Two knobs, as in SPDK: the log level (what is logged at all) and the print level (what reaches
stderr).  NOTICE sits between INFO and WARNING.
"""

from __future__ import annotations

import logging
import sys

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
LEVELS = {"ERROR": logging.ERROR, "WARNING": logging.WARNING, "NOTICE": NOTICE,
          "INFO": logging.INFO, "DEBUG": logging.DEBUG}


class Logs:
    def __init__(self, level: str = "NOTICE", print_level: str = "INFO") -> None:
        self.root = logging.getLogger("vhostd")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(
            "[%(asctime)s.%(msecs)03d] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.root.addHandler(self.handler)
        self.root.propagate = False
        self.level = self.print_level = ""
        self.set_level(level)
        self.set_print_level(print_level)

    def set_level(self, name: str) -> None:
        self.level = name
        self.root.setLevel(LEVELS[name])

    def set_print_level(self, name: str) -> None:
        self.print_level = name
        self.handler.setLevel(LEVELS[name])

    def close(self) -> None:
        self.root.removeHandler(self.handler)
