"""The downloader on a cluster, against a real HTTP server on 127.0.0.1: loopback, private,
link-local and metadata addresses are blocked unless allowed, also after a redirect; redirects
are capped; ``Retry-After`` is honoured within a bound; one deadline bounds a URL's headers,
body and retries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest

from tests.plugins.http_server import LoopbackServer, Route, body, drip, send
from vlmray.config.inputs import DownloadConfig
from vlmray.data import schema
from vlmray.data.curation.download import (
    DOWNLOAD_BLOCKED,
    DOWNLOAD_HTTP_ERROR,
    DOWNLOAD_REDIRECTS,
    DOWNLOAD_TIMEOUT,
    DownloadStage,
)
from vlmray.data.curation.safe_http import AddressPolicy
from vlmray.data.curation.stage import filled

SECRET = b"internal service: do not fetch"


def redirect(location: str) -> Route:
    """302 to ``location`` ("{port}" filled in with the server's port)."""
    def route(request: BaseHTTPRequestHandler, hit: int) -> None:
        request.send_response(302)
        request.send_header("Location", location.format(port=request.server.server_address[1]))
        request.send_header("Content-Length", "0")
        request.end_headers()
    return route


def busy(code: int, retry_after: str) -> Route:
    """``code`` with ``Retry-After`` on the first request, then 200."""
    def route(request: BaseHTTPRequestHandler, hit: int) -> None:
        if hit > 1:
            send(request, 200, SECRET)
            return
        request.send_response(code)
        request.send_header("Retry-After", retry_after)
        request.send_header("Content-Length", "0")
        request.end_headers()
    return route


def slow_headers(request: BaseHTTPRequestHandler, hit: int) -> None:
    """The status line, then one header byte every 0.2 s for up to 5 s: each read is well
    within the read timeout, the headers never end."""
    request.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    try:
        for _ in range(25):
            request.wfile.write(b"x")
            request.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackServer]:
    routes = {"/secret": body(SECRET), "/to-loopback": redirect("http://127.0.0.1:{port}/secret"),
              "/relative": redirect("secret"), "/loop": redirect("/loop"),
              "/busy": busy(503, "1"), "/busy-long": busy(429, "3600"),
              "/slow-headers": slow_headers, "/drip": drip(1000, 0.5, max_s=8.0)}
    with LoopbackServer(routes) as srv:
        yield srv


def _fetch(urls: list[str], **cfg) -> dict[str, np.ndarray]:
    cfg = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, **cfg}
    url = filled("", len(urls))
    url[:] = urls
    batch = {schema.KEY: np.asarray([f"k{i}" for i in range(len(urls))], dtype=object),
             schema.URL: url, schema.IMAGE: filled(None, len(urls))}
    return DownloadStage(DownloadConfig(**cfg))(batch)


def test_internal_addresses_are_blocked_by_default(server) -> None:
    port = server.port
    urls = [f"http://localhost:{port}/secret", f"http://127.0.0.1:{port}/secret",
            f"http://[::ffff:127.0.0.1]:{port}/secret", f"http://0.0.0.0:{port}/secret",
            f"http://[::1]:{port}/secret", "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/x.jpg", "https://192.168.1.1/x.jpg", "http://100.100.100.200/"]
    t0 = time.perf_counter()
    out = _fetch(urls)
    assert list(out[schema.REJECT_REASON]) == [DOWNLOAD_BLOCKED] * len(urls)
    assert server.hits["/secret"] == 0                    # refused before connecting
    assert time.perf_counter() - t0 < 1.0                 # not retried, nothing waited on


def test_a_redirect_is_checked_again(server) -> None:
    hop = f"http://localhost:{server.port}/to-loopback"
    out = _fetch([hop], allow_hosts=["localhost"])        # the first host is allowed by name
    assert out[schema.REJECT_REASON][0] == DOWNLOAD_BLOCKED
    assert server.hits["/to-loopback"] == 1 and server.hits["/secret"] == 0
    allowed = _fetch([hop], allow_hosts=["localhost", "127.0.0.1"])
    assert allowed[schema.REJECT_REASON][0] == "" and allowed[schema.IMAGE][0] == SECRET


def test_opting_in_to_private_addresses(server) -> None:
    url = server.url("/secret")
    for cfg in ({"allow_private": True}, {"allow_hosts": ["127.0.0.0/8"]}):
        assert _fetch([url], **cfg)[schema.IMAGE][0] == SECRET
    metadata = _fetch(["http://169.254.169.254/latest/meta-data/"], allow_private=True)
    assert metadata[schema.REJECT_REASON][0] == DOWNLOAD_BLOCKED   # never by allow_private
    with pytest.raises(ValueError, match="download.allow_hosts: 'http://mirror'"):
        DownloadConfig(allow_hosts=["http://mirror"])


def test_address_policy() -> None:
    default = AddressPolicy(DownloadConfig())
    assert default.allows("example.com", "93.184.216.34")
    assert default.allows("example.com", "2606:2800:220:1:248:1893:25c8:1946")
    for address in ("127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.0.1", "100.64.0.1",
                    "169.254.169.254", "192.0.0.192", "fd00:ec2::254", "fe80::1", "::1",
                    "::ffff:10.0.0.1", "0.0.0.0", "224.0.0.1"):
        assert not default.allows("example.com", address), address
    mirror = AddressPolicy(DownloadConfig(allow_hosts=["Mirror.Internal", "169.254.0.0/16"]))
    assert mirror.allows("mirror.internal.", "10.0.0.5")
    assert not mirror.allows("mirror.internal", "fd00:ec2::254")   # metadata: only by network
    assert mirror.allows("other", "169.254.169.254")
    assert not mirror.allows("other", "10.0.0.5")


def test_redirects_are_followed_and_capped(server) -> None:
    ok, loop = server.url("/relative"), server.url("/loop")
    out = _fetch([ok, loop], max_redirects=3, allow_hosts=["127.0.0.1"])
    assert list(out[schema.REJECT_REASON]) == ["", DOWNLOAD_REDIRECTS]
    assert out[schema.IMAGE][0] == SECRET
    assert server.hits["/loop"] == 4                      # the request and 3 redirects


def test_retry_after_is_honoured_within_its_bound(server) -> None:
    t0 = time.perf_counter()
    out = _fetch([server.url("/busy")], allow_hosts=["127.0.0.1"])
    assert out[schema.IMAGE][0] == SECRET and server.hits["/busy"] == 2
    assert time.perf_counter() - t0 >= 1.0                # waited what the server asked
    t0 = time.perf_counter()
    out = _fetch([server.url("/busy-long")], allow_hosts=["127.0.0.1"], retry_after_max_s=5)
    assert out[schema.REJECT_REASON][0] == DOWNLOAD_HTTP_ERROR
    assert server.hits["/busy-long"] == 1                 # an hour is more than we wait
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("path", ["/slow-headers", "/drip"])
def test_one_deadline_bounds_headers_body_and_retries(server, path: str) -> None:
    """A byte every 0.2-0.5 s keeps each read within ``timeout_s``; the deadline still cuts
    the URL off, retries included."""
    t0 = time.perf_counter()
    out = _fetch([server.url(path)], allow_hosts=["127.0.0.1"], timeout_s=1.0, deadline_s=1.5,
                 retries=2)
    assert out[schema.REJECT_REASON][0] == DOWNLOAD_TIMEOUT
    assert time.perf_counter() - t0 < 2.5                 # one deadline, not one per attempt
