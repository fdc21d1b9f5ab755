"""Host names and addresses: which are this machine's, and the host and port a URL points at."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback_host(host: str) -> bool:
    """True for 'localhost' and loopback IP literals (127.0.0.0/8, ::1, with or without brackets).

    Other names are not loopback even if they resolve to 127.0.0.1 today: a name can be pointed anywhere
    (DNS rebinding), a literal cannot.
    """
    value = host.strip().lower()
    if value in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(value.strip("[]")).is_loopback
    except ValueError:
        return False


def host_port(url: str) -> tuple[str, int]:
    """The host and port a URL points at (the scheme's port when it names none)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return host, port


def is_loopback_url(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


def port_in_use(host: str, port: int) -> bool:
    """Whether something holds host:port (binding it fails with 'address in use')."""
    import errno
    import os
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as s:
            if os.name != "nt":
                # As servers do: a port left in TIME_WAIT by a stopped server reads as free, as it is.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
                    return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it); for servers that cannot take port 0 themselves."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
