"""Safe HTTP for the downloader: which addresses may be connected to (:class:`AddressPolicy`:
loopback, private, link-local and cloud-metadata addresses are refused unless allowed, checked
on the address actually connected to) and connections whose every read shares one deadline, so
a server that drips headers or body cannot hold a download thread.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from vlmray.config.inputs import DownloadConfig

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254",    # AWS, GCP, Azure, ECS; AWS IPv6
    "100.100.100.200", "192.0.0.192"))                      # Alibaba, Oracle


class BlockedAddress(OSError):
    """Every address a host resolves to is one the policy refuses."""


class AddressPolicy:
    """Which addresses downloads may connect to, and the connecting itself.

    Public (globally routable, unicast) addresses always; non-public ones (loopback, private,
    shared, reserved) only with ``allow_private`` or for a host named in ``allow_hosts``;
    link-local and cloud-metadata addresses only inside a network listed in ``allow_hosts``.
    """

    def __init__(self, cfg: DownloadConfig) -> None:
        self.allow_private = cfg.allow_private
        self.names, self.networks = cfg.allow_networks()

    def allows(self, host: str, address: str) -> bool:
        """Whether ``address`` (one that ``host`` resolved to) may be connected to."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip          # ::ffff:127.0.0.1 is 127.0.0.1
        if any(ip in net for net in self.networks):
            return True
        if (ip in METADATA_ADDRESSES or ip.is_link_local or ip.is_multicast
                or ip.is_unspecified):
            return False
        named = host.lower().rstrip(".") in self.names
        return ip.is_global or self.allow_private or named

    def connect(self, host: str, port: int, timeout: float, deadline: float) -> socket.socket:
        """A socket connected to an allowed address of ``host`` (the address checked is the
        one connected to, so DNS cannot answer differently in between)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        allowed = [i for i in infos if self.allows(host, str(i[4][0]))]
        if not allowed:
            found = sorted({str(i[4][0]) for i in infos})
            raise BlockedAddress(f"{host} resolves only to blocked addresses {found}")
        error: OSError = OSError(f"no address of {host} accepted a connection")
        for family, kind, proto, _, address in allowed:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(_time_left(timeout, deadline))
                sock.connect(address)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error


def _time_left(timeout: float, deadline: float) -> float:
    """The socket timeout for the next wait: ``timeout``, or less when the deadline is near;
    TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("download deadline passed")
    return min(timeout, left)


class _TimedSocket:
    """A connected socket whose every send and receive waits at most what is left of the
    deadline; what http.client's connection and response see as their socket."""

    def __init__(self, sock: socket.socket, timeout: float, deadline: float) -> None:
        self._sock, self._timeout, self._deadline = sock, timeout, deadline
        self._readers, self._closed = 0, False

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_time_left(self._timeout, self._deadline))
        self._sock.sendall(data)

    def recv_into(self, buffer: Any) -> int:
        self._sock.settimeout(_time_left(self._timeout, self._deadline))
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_TimedReader(self))

    def release(self) -> None:
        self._readers -= 1
        self._close_if_done()

    def close(self) -> None:
        """Closes the socket once no response still reads from it (http.client closes the
        connection before the body is read when the server will hang up after it)."""
        self._closed = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self._closed and self._readers <= 0:
            self._sock.close()


class _TimedReader(io.RawIOBase):
    def __init__(self, sock: _TimedSocket) -> None:
        self._timed = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._timed.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._timed.release()
        super().close()


def connection(url: str, policy: AddressPolicy, timeout: float, deadline: float,
                context: ssl.SSLContext) -> tuple[http.client.HTTPConnection, str]:
    """An unopened connection for ``url`` that connects through ``policy``, and the request
    target (path and query)."""
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    host, port = parts.hostname or "", parts.port or (443 if https else 80)

    def connect(conn: http.client.HTTPConnection) -> None:
        sock: socket.socket = policy.connect(host, port, timeout, deadline)
        if https:
            sock = context.wrap_socket(sock, server_hostname=host)
        conn.sock = _TimedSocket(sock, timeout, deadline)

    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    conn = kind(host, port, timeout=timeout)
    conn.connect = lambda: connect(conn)        # type: ignore[method-assign]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return conn, target


__all__ = ["METADATA_ADDRESSES", "AddressPolicy", "BlockedAddress", "connection"]
