"""Block and record every socket connection to a host other than loopback.

An audit hook (PEP 578) sees each `socket.connect` and `socket.getaddrinfo` in
this process, whichever library makes it. A connection to any address outside
127.0.0.0/8 and ::1 raises `OSError` before it is made, and is recorded so the
benchmark can stop and name the culprit. Name lookups of other hosts are
blocked the same way.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from typing import Any

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


class ForeignHostError(RuntimeError):
    """Raised by `check()` when code in this process tried to reach another host."""


class _Guard:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self.installed = False
        self._lock = threading.Lock()

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.connect":
            target = _connect_target(args)
        elif event == "socket.getaddrinfo":
            target = _lookup_target(args)
        else:
            return
        if target is None:
            return
        with self._lock:
            self.violations.append(f"{event} {target}")
        raise OSError(f"benchmark network guard: {event} to {target} is blocked")


_GUARD = _Guard()


def _is_loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _connect_target(args: tuple[Any, ...]) -> str | None:
    sock, address = args[0], args[1]
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None  # Unix sockets and socket pairs stay on this machine.
    host = address[0] if isinstance(address, tuple) else address
    return None if _is_loopback(host) else repr(address)


def _lookup_target(args: tuple[Any, ...]) -> str | None:
    host = args[0]
    return None if _is_loopback(host) else repr(host)


def install() -> None:
    """Install the guard once for the life of the process (hooks cannot be removed)."""
    if not _GUARD.installed:
        sys.addaudithook(_GUARD.hook)
        _GUARD.installed = True


def violations() -> list[str]:
    return list(_GUARD.violations)


def check(context: str) -> None:
    """Raise `ForeignHostError` if anything tried to reach a non-loopback host."""
    found = violations()
    if found:
        raise ForeignHostError(
            f"{context}: blocked attempts to reach hosts other than 127.0.0.1: "
            + "; ".join(found[:10])
        )
