"""The downloader against a real HTTP server on 127.0.0.1: retries, timeouts, robots headers,
size limits, refused connections and the per-host concurrency limit."""

from __future__ import annotations

import dataclasses
import io
import pickle
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pytest
from PIL import Image

from vlmray.cli import field_docs
from vlmray.config.inputs import DownloadConfig
from vlmray.data import schema
from vlmray.data.curation.download import (
    DOWNLOAD_ERROR,
    DOWNLOAD_HTTP_ERROR,
    DOWNLOAD_TIMEOUT,
    DOWNLOAD_TOO_LARGE,
    ROBOTS_DISALLOWED,
    DownloadStage,
    robots_disallowed,
)
from vlmray.data.curation.stage import filled


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
BIG = b"x" * 5000


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def handle_error(self, request, client_address) -> None:   # clients that gave up
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
             length: bool = True) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits[self.path] += 1
            hit = self.server.hits[self.path]
        parts = urlsplit(self.path)
        ROUTES[parts.path](self, hit, {k: v[0] for k, v in parse_qs(parts.query).items()})

    def flaky(self, hit: int, q: dict[str, str]) -> None:
        self.send(int(q.get("code", 500))) if hit == 1 else self.send(200, PNG)

    def slow(self, hit: int, q: dict[str, str]) -> None:
        time.sleep(1.0)
        self.send(200, PNG)

    def trickle(self, hit: int, q: dict[str, str]) -> None:
        """A byte every 50 ms: each read is well within the timeout, the body never ends."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(60):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def concurrent(self, hit: int, q: dict[str, str]) -> None:
        srv = self.server
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        time.sleep(0.15)
        with srv.lock:
            srv.in_flight -= 1
        self.send(200, PNG)


ROUTES: dict[str, Callable[[_Handler, int, dict[str, str]], None]] = {
    "/ok.png": lambda h, n, q: h.send(200, PNG),
    "/empty": lambda h, n, q: h.send(200, b""),
    "/missing": lambda h, n, q: h.send(404, b"not here"),
    "/flaky": _Handler.flaky,
    "/down": lambda h, n, q: h.send(503),
    "/slow": _Handler.slow,
    "/robots": lambda h, n, q: h.send(200, PNG, {"X-Robots-Tag": q["tag"]}),
    "/big": lambda h, n, q: h.send(200, BIG),
    "/big-unsized": lambda h, n, q: h.send(200, BIG, length=False),
    "/concurrent": _Handler.concurrent,
    "/trickle": _Handler.trickle,
}


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _url(srv: _Server, path: str) -> str:
    """A URL on the server; the ``u`` query makes each test's hit counter its own."""
    sep = "&" if "?" in path else "?"
    return f"http://127.0.0.1:{srv.server_address[1]}{path}{sep}u={uuid.uuid4().hex[:8]}"


def _hits(srv: _Server, url: str) -> int:
    return srv.hits[url.split(str(srv.server_address[1]), 1)[1]]


def _batch(urls: list[str], images: list[bytes | None] | None = None) -> dict[str, np.ndarray]:
    n = len(urls)
    img = filled(None, n)
    img[:] = images if images is not None else [None] * n
    url = filled("", n)
    url[:] = urls
    key = filled("", n)
    key[:] = [f"k{i}" for i in range(n)]
    return {schema.KEY: key, schema.URL: url, schema.IMAGE: img}


LOCAL = ["127.0.0.1"]                  # the test server's address: allowed explicitly


def _run(urls: list[str], images: list[bytes | None] | None = None, **cfg) -> dict:
    cfg = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, "allow_hosts": LOCAL, **cfg}
    return DownloadStage(DownloadConfig(**cfg))(_batch(urls, images))


def test_fetches_in_row_order_and_passes_other_rows_through(server) -> None:
    urls = [_url(server, "/missing"), _url(server, "/ok.png"), "", _url(server, "/ok.png"),
            _url(server, "/empty")]
    out = _run(urls, images=[None, None, None, b"already", None])
    assert list(out[schema.REJECT_REASON]) == [DOWNLOAD_HTTP_ERROR, "", "", "", ""]
    assert list(out[schema.REJECT_STAGE]) == ["download", "", "", "", ""]
    assert list(out[schema.IMAGE]) == [b"", PNG, None, b"already", b""]
    assert list(out[schema.KEY]) == ["k0", "k1", "k2", "k3", "k4"]
    assert _hits(server, urls[0]) == 1                       # a 404 is not retried
    assert _hits(server, urls[3]) == 0                       # had an image: not fetched


def test_rows_rejected_earlier_are_not_fetched(server) -> None:
    url = _url(server, "/ok.png")
    batch = _batch([url])
    batch[schema.REJECT_REASON] = filled("bad_text", 1)
    out = DownloadStage(DownloadConfig(allow_hosts=LOCAL))(batch)
    assert out[schema.REJECT_REASON][0] == "bad_text" and _hits(server, url) == 0


@pytest.mark.parametrize("code", [500, 429])
def test_retryable_status_is_retried(server, code: int) -> None:
    url = _url(server, f"/flaky?code={code}")
    out = _run([url])
    assert out[schema.REJECT_REASON][0] == "" and out[schema.IMAGE][0] == PNG
    assert _hits(server, url) == 2


def test_gives_up_after_exactly_one_plus_retries_attempts(server) -> None:
    url = _url(server, "/down")
    t0 = time.perf_counter()
    out = _run([url], retries=2, backoff_s=0.1)
    assert out[schema.REJECT_REASON][0] == DOWNLOAD_HTTP_ERROR
    assert _hits(server, url) == 3
    assert time.perf_counter() - t0 >= 0.1 + 0.2             # exponential backoff waited


def test_slow_response_times_out(server) -> None:
    url = _url(server, "/slow")
    out = _run([url], timeout_s=0.3, retries=1)
    assert out[schema.REJECT_REASON][0] == DOWNLOAD_TIMEOUT
    assert out[schema.IMAGE][0] == b"" and _hits(server, url) == 2


def test_trickling_body_is_cut_at_the_deadline(server) -> None:
    url = _url(server, "/trickle")
    t0 = time.perf_counter()
    out = _run([url], timeout_s=0.3, deadline_s=0.5, retries=0)
    assert out[schema.REJECT_REASON][0] == DOWNLOAD_TIMEOUT
    assert time.perf_counter() - t0 < 2.0                    # not the 3 s the server drips


@pytest.mark.parametrize("tag, allowed", [
    ("noai", False), ("NoImageAI, nofollow", False), ("vlmray: noindex", False),
    ("otherbot: noai", True), ("nofollow", True), ("unavailable_after: 1 Jan 2030", True),
])
def test_robots_header(server, tag: str, allowed: bool) -> None:
    url = _url(server, f"/robots?tag={quote(tag)}")
    out = _run([url])
    assert out[schema.REJECT_REASON][0] == ("" if allowed else ROBOTS_DISALLOWED)
    if not allowed:
        assert _run([url], respect_robots_headers=False)[schema.REJECT_REASON][0] == ""


def test_robots_header_parsing() -> None:
    assert robots_disallowed(["noindex, otherbot: noai"], "vlmray")
    assert robots_disallowed(["otherbot: nofollow", "VLMRAY: none"], "vlmray")
    assert not robots_disallowed(["otherbot: noai, noimageai"], "vlmray")
    assert not robots_disallowed([], "vlmray")
    assert DownloadConfig(user_agent="MyBot/2.0 (+https://x)").bot_token == "mybot"


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_oversize_body_is_rejected(server, path: str) -> None:
    out = _run([_url(server, path)], max_bytes=1000)
    assert out[schema.REJECT_REASON][0] == DOWNLOAD_TOO_LARGE
    assert _run([_url(server, path)], max_bytes=len(BIG))[schema.IMAGE][0] == BIG


def test_refused_connection_and_bad_urls_are_download_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                            # closed again: nothing listens
    urls = [f"http://127.0.0.1:{port}/x.png", "ftp://127.0.0.1/x.png", "file:///etc/hosts",
            "not a url", "http://", "http://127.0.0.1:99999/x"]
    out = _run(urls, retries=1)
    assert list(out[schema.REJECT_REASON]) == [DOWNLOAD_ERROR] * len(urls)


def test_per_host_limit_holds_with_more_threads(server) -> None:
    server.max_in_flight = 0
    urls = [_url(server, "/concurrent") for _ in range(10)]
    t0 = time.perf_counter()
    out = _run(urls, threads=8, per_host=2)
    assert list(out[schema.REJECT_REASON]) == [""] * 10
    assert server.max_in_flight == 2                         # parallel, but never above 2
    assert time.perf_counter() - t0 >= 5 * 0.15


def test_config_is_documented_validated_and_stage_pickles(server) -> None:
    assert set(field_docs(DownloadConfig)) == {f.name for f in dataclasses.fields(DownloadConfig)}
    with pytest.raises(ValueError, match="download.retries"):
        DownloadConfig(retries=-1)
    with pytest.raises(ValueError, match="download.per_host"):
        DownloadConfig(per_host=0)
    stage = DownloadStage(DownloadConfig(threads=2, allow_hosts=LOCAL))
    stage(_batch([_url(server, "/ok.png")]))                 # set up: threads and locks
    clone = pickle.loads(pickle.dumps(stage))                # as Ray ships it to workers
    assert clone(_batch([_url(server, "/ok.png")]))[schema.IMAGE][0] == PNG
