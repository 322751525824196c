"""Readiness and state for a service manager: systemd's notify protocol (sd_notify(3)).

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET``, a datagram socket path (a leading ``@`` is
the abstract namespace).  vhostd sends ``READY=1`` once its RPC socket is listening and its config's
controllers are up, ``STATUS=`` lines a human reads in ``systemctl status``, and ``STOPPING=1``
when it starts draining.  Without ``NOTIFY_SOCKET`` every call does nothing.  A failed send is
logged, never raised: the service manager's bookkeeping must not take the data path down.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("vhostd.notify")


def socket_address(text: str) -> str | bytes:
    """The address ``NOTIFY_SOCKET`` names, as :meth:`socket.socket.sendto` takes it."""
    if text.startswith("@"):
        return b"\0" + text[1:].encode()
    return text


def message(**fields: str | int) -> bytes:
    """``KEY=value`` lines; a value may not hold a newline (the protocol's separator)."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError("notify field %s holds a newline" % key)
        lines.append("%s=%s" % (key, text))
    return ("\n".join(lines) + "\n").encode()


class ServiceNotifier:
    def __init__(self, notify_socket: str | None = None) -> None:
        if notify_socket is None:
            notify_socket = os.environ.get("NOTIFY_SOCKET") or None
        self.address = socket_address(notify_socket) if notify_socket else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> None:
        if self.address is None:
            return
        data = message(**fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager on %r: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping: draining controllers")
