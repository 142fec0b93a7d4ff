"""A real HTTP server on 127.0.0.1 for tests that download: routes by path, counts requests.

    with LoopbackServer({"/a.jpg": body(JPEG, "image/jpeg"), "/404": status(404)}) as srv:
        url = srv.url("/a.jpg")            # http://127.0.0.1:<port>/a.jpg
        ...
        assert srv.hits["/a.jpg"] == 1     # requests per path (query ignored)

A route is ``handler(request, hit)``: the BaseHTTPRequestHandler and how many times its path
has been asked for, this request included. :func:`body`, :func:`status` and :func:`drip`
make the common ones; :func:`closed_port` gives a loopback port nothing listens on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

Route = Callable[[BaseHTTPRequestHandler, int], None]

__all__ = ["LoopbackServer", "Route", "body", "closed_port", "drip", "status"]


def send(request: BaseHTTPRequestHandler, code: int, data: bytes = b"",
         content_type: str = "application/octet-stream") -> None:
    """A whole response with its ``Content-Length``."""
    request.send_response(code)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def body(data: bytes, content_type: str = "application/octet-stream") -> Route:
    """200 with ``data``."""
    return lambda request, hit: send(request, 200, data, content_type)


def status(code: int) -> Route:
    """An error status with a short body."""
    return lambda request, hit: send(request, code, f"status {code}".encode(), "text/plain")


def drip(size: int, every_s: float, *, chunk: int = 1, max_s: float = 10.0) -> Route:
    """200 announcing ``size`` bytes, then ``chunk`` bytes every ``every_s`` seconds: a stall
    when ``every_s`` exceeds the client's read timeout, a trickle when it does not. Stops after
    ``max_s`` seconds or when the client hangs up, so no server thread outlives the test."""
    def route(request: BaseHTTPRequestHandler, hit: int) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "image/jpeg")
        request.send_header("Content-Length", str(size))
        request.end_headers()
        deadline, sent = time.monotonic() + max_s, 0
        try:
            while sent < size and time.monotonic() < deadline:
                request.wfile.write(b"\xff" * chunk)
                request.wfile.flush()
                sent += chunk
                time.sleep(every_s)
        except OSError:                                  # the client gave up: good
            pass
    return route


def closed_port() -> int:
    """A loopback port that was free a moment ago and that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.hits[path] += 1
            hit = self.server.hits[path]
        route = self.server.routes.get(path)
        if route is None:
            send(self, 404, b"no route", "text/plain")
        else:
            route(self, hit)


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 (a free port), serving ``routes`` until closed."""

    daemon_threads = True

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass                                             # clients that gave up mid-response

    def __enter__(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
