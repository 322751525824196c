"""Logging with SPDK's level names: ERROR, WARNING, NOTICE, INFO, DEBUG.

Two knobs, as in SPDK: the log level (what is logged at all) and the print level (what reaches
stderr).  NOTICE sits between INFO and WARNING.  Two formats: SPDK-like text lines, or
(``--log-format json``) one JSON object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
import time

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
LEVELS = {"ERROR": logging.ERROR, "WARNING": logging.WARNING, "NOTICE": NOTICE,
          "INFO": logging.INFO, "DEBUG": logging.DEBUG}
FORMATS = ("text", "json")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, RFC 3339 with milliseconds), level (SPDK's name),
    logger, message, pid, and exception (the traceback) when there is one.  A newline in a message
    stays escaped inside its string, so a line is always one whole record."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "time": "%s.%03dZ" % (stamp, int(record.msecs)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def text_formatter() -> logging.Formatter:
    return logging.Formatter("[%(asctime)s.%(msecs)03d] %(levelname)s %(name)s: %(message)s",
                             "%Y-%m-%d %H:%M:%S")


class Logs:
    def __init__(self, level: str = "NOTICE", print_level: str = "INFO", log_format: str = "text") -> None:
        if log_format not in FORMATS:
            raise ValueError("log format %r is not one of %s" % (log_format, ", ".join(FORMATS)))
        self.root = logging.getLogger("vhostd")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(JsonLineFormatter() if log_format == "json" else text_formatter())
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
