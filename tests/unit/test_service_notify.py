"""The notify protocol's encoding (the datagram path is tested against a live daemon)."""

import socket

import pytest

from vhostd.service_notify import ServiceNotifier, message, socket_address


def test_fields_become_newline_terminated_lines():
    assert message(READY=1, STATUS="serving 2 controllers") == b"READY=1\nSTATUS=serving 2 controllers\n"


def test_a_newline_in_a_value_is_refused():
    with pytest.raises(ValueError, match="STATUS"):
        message(STATUS="two\nlines")


def test_at_sign_is_the_abstract_namespace():
    assert socket_address("@/org/freedesktop/systemd1/notify") == b"\0/org/freedesktop/systemd1/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = ServiceNotifier()
    assert not notifier.enabled
    notifier.ready("x")     # no socket, no error


def test_ready_reaches_the_socket(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "n"))
        ServiceNotifier(str(tmp_path / "n")).ready("up")
        fields = dict(line.split("=", 1) for line in sock.recv(1024).decode().splitlines())
    assert fields["READY"] == "1" and fields["STATUS"] == "up" and fields["MAINPID"].isdigit()
