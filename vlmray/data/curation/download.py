"""Download the images of URL-list rows: bounded retries, per-host limits, ``X-Robots-Tag``,
no private addresses, one deadline per URL.

For each live row with a non-empty ``URL`` and no ``IMAGE``, :class:`DownloadStage` fetches the
URL (http/https only) on a thread pool made once per worker, at most ``per_host`` requests at a
time to one host, and stores the body in ``IMAGE``. Timeouts, connection errors and HTTP
5xx/429 are retried with exponential backoff (or the server's bounded ``Retry-After``); other
4xx are not. Failures become reject reasons; results keep row order whatever order the
requests finish in.

A URL list is untrusted input running inside the cluster, so every connection goes to an
address checked first (:class:`~vlmray.data.curation.safe_http.AddressPolicy`): loopback, private, link-local and
cloud-metadata addresses are ``download_blocked`` unless ``download.allow_private`` or
``download.allow_hosts`` allows them. The check runs on the address actually connected to (no
second DNS lookup to rebind), and again on every redirect hop, which this module follows itself
(at most ``max_redirects``). ``deadline_s`` bounds one URL's whole download: each socket read
waits at most what is left of it, so a server dripping headers or body cannot hold a thread.

    batch = DownloadStage(DownloadConfig(threads=32, per_host=8))(batch)
"""

from __future__ import annotations

import email.utils
import http.client
import itertools
import socket
import ssl
import string
import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote, urljoin, urlsplit

from vlmray.config.inputs import DownloadConfig
from vlmray.data import schema
from vlmray.data.curation.safe_http import (
    AddressPolicy,
    BlockedAddress,
    connection,
)
from vlmray.data.curation.stage import Batch, Resources, Stage, StageOutput, filled, num_rows

DOWNLOAD_TIMEOUT = "download_timeout"
DOWNLOAD_HTTP_ERROR = "download_http_error"
DOWNLOAD_ERROR = "download_error"
DOWNLOAD_TOO_LARGE = "download_too_large"
DOWNLOAD_BLOCKED = "download_blocked"
DOWNLOAD_REDIRECTS = "download_too_many_redirects"
ROBOTS_DISALLOWED = "robots_disallowed"
REASONS = (DOWNLOAD_TIMEOUT, DOWNLOAD_HTTP_ERROR, DOWNLOAD_ERROR, DOWNLOAD_TOO_LARGE,
           DOWNLOAD_BLOCKED, DOWNLOAD_REDIRECTS, ROBOTS_DISALLOWED)

ROBOTS_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "none"})
_ARGUMENT_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                  "max-video-preview"})   # "name: value", not "bot: directive"
_SCHEMES = ("http", "https")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
def robots_disallowed(values: Iterable[str], bot: str) -> bool:
    """True when an ``X-Robots-Tag`` header value forbids use by all bots or by ``bot``.

    Values are comma-separated directives, optionally after ``<bot>:`` which applies to the
    directives that follow it: ``noai``, ``NoImageAI, noindex``, ``otherbot: noai``.
    """
    for value in values:
        target = ""
        for item in value.split(","):
            name, colon, rest = item.partition(":")
            if colon and name.strip().lower() not in _ARGUMENT_DIRECTIVES:
                target, item = name.strip().lower(), rest
            if target in ("", bot) and item.strip().lower() in ROBOTS_DIRECTIVES:
                return True
    return False


@dataclass(frozen=True)
class _Result:
    body: bytes | None = None
    reason: str = ""
    retry: bool = False
    wait_s: float | None = None          # the server's Retry-After, when it gave one


def _error_result(err: BaseException) -> _Result:
    """An exception -> its reject reason and whether to retry."""
    if isinstance(err, BlockedAddress):
        return _Result(reason=DOWNLOAD_BLOCKED)
    if isinstance(err, TimeoutError):
        return _Result(reason=DOWNLOAD_TIMEOUT, retry=True)
    if isinstance(err, (socket.gaierror, http.client.InvalidURL)):
        return _Result(reason=DOWNLOAD_ERROR)            # DNS / bad URL: retrying won't help
    retry = isinstance(err, (ConnectionError, http.client.HTTPException))
    return _Result(reason=DOWNLOAD_ERROR, retry=retry)


def _retry_after(value: str | None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _round_robin(hosts: list[str]) -> list[int]:
    """Row indices interleaved across hosts, so queued requests spread over hosts."""
    groups: dict[str, list[int]] = {}
    for i, host in enumerate(hosts):
        groups.setdefault(host, []).append(i)
    spread = itertools.chain.from_iterable(itertools.zip_longest(*groups.values()))
    return [i for i in spread if i is not None]


class DownloadStage(Stage):
    """Fetches ``URL`` into ``IMAGE`` for rows that have a URL and no image."""

    name: ClassVar[str] = "download"
    reasons: ClassVar[tuple[str, ...]] = REASONS
    resources = Resources(num_cpus=0.5, batch_size=64)   # waits on sockets, not a core

    def __init__(self, cfg: DownloadConfig | None = None) -> None:
        self.cfg = cfg or DownloadConfig()
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}                  # threads and locks are made again in setup()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"])

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="download")
        weakref.finalize(self, self._pool.shutdown, wait=False)
        self._policy = AddressPolicy(self.cfg)
        self._context = ssl.create_default_context()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def process(self, batch: Batch) -> StageOutput:
        n = num_rows(batch)
        if schema.URL not in batch:
            return StageOutput()
        urls = batch[schema.URL]
        images = (batch[schema.IMAGE].astype(object) if schema.IMAGE in batch
                  else filled(None, n))
        todo = [i for i in range(n) if urls[i] and images[i] is None]
        if not todo:
            return StageOutput()
        reasons = filled("", n)
        for i, result in zip(todo, self._fetch_all([str(urls[i]).strip() for i in todo])):
            images[i], reasons[i] = result.body, result.reason
        return StageOutput(columns={schema.IMAGE: images}, reasons=reasons)

    def _fetch_all(self, urls: list[str]) -> list[_Result]:
        """Results in the order of ``urls`` (requests run concurrently)."""
        if self._pool is None:
            self.setup()
        hosts = [(_host(u) or "") for u in urls]
        futures = {i: self._pool.submit(self._fetch, urls[i]) for i in _round_robin(hosts)}
        return [futures[i].result() for i in range(len(urls))]

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = threading.BoundedSemaphore(self.cfg.per_host)
            return self._hosts[host]

    def _fetch(self, url: str) -> _Result:
        """Every attempt at ``url``, within one deadline that starts when the first attempt
        gets its host slot (queueing behind other rows of the same host is not the URL's)."""
        host = _host(url)
        if host is None:
            return _Result(reason=DOWNLOAD_ERROR)
        result, deadline = _Result(), 0.0
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                wait = (result.wait_s if result.wait_s is not None
                        else self.cfg.backoff_s * 2 ** (attempt - 1))
                if time.monotonic() + wait >= deadline:
                    break                                # no time left for another attempt
                time.sleep(wait)
            with self._slot(host):
                deadline = deadline or time.monotonic() + self.cfg.deadline_s
                result = self._attempt(url, deadline)
            if not result.retry:
                break
        return result

    def _attempt(self, url: str, deadline: float) -> _Result:
        """One attempt: the request, and each redirect hop (its address checked again)."""
        try:
            for _ in range(self.cfg.max_redirects + 1):
                conn, target = connection(url, self._policy, self.cfg.timeout_s, deadline,
                                           self._context)
                try:
                    conn.request("GET", target, headers={"User-Agent": self.cfg.user_agent,
                                                         "Connection": "close"})
                    with conn.getresponse() as response:
                        location = response.getheader("Location")
                        if response.status not in _REDIRECTS or not location:
                            return self._response(response)
                finally:
                    conn.close()
                url = urljoin(url, quote(location.strip(), safe=string.punctuation))
                if _host(url) is None:                   # a redirect to ftp:, file:, ...
                    return _Result(reason=DOWNLOAD_HTTP_ERROR)
            return _Result(reason=DOWNLOAD_REDIRECTS)
        except (OSError, http.client.HTTPException) as e:
            return _error_result(e)
        except (ValueError, OverflowError):      # a malformed URL, a port out of range
            return _Result(reason=DOWNLOAD_ERROR)

    def _response(self, response: http.client.HTTPResponse) -> _Result:
        """A final (non-redirect) response -> its body or reject reason."""
        if not 200 <= response.status < 300:
            retry = response.status >= 500 or response.status == 429
            wait = _retry_after(response.getheader("Retry-After")) if retry else None
            if wait is not None and wait > self.cfg.retry_after_max_s:
                retry = False                            # asks for longer than we wait
            return _Result(reason=DOWNLOAD_HTTP_ERROR, retry=retry, wait_s=wait)
        return self._read(response)

    def _read(self, response: http.client.HTTPResponse) -> _Result:
        headers, cfg = response.headers, self.cfg
        if cfg.respect_robots_headers and robots_disallowed(
                headers.get_all("X-Robots-Tag") or [], cfg.bot_token):
            return _Result(reason=ROBOTS_DISALLOWED)
        declared = headers.get("Content-Length", "").strip()
        length = int(declared) if declared.isdigit() else None
        if length is not None and length > cfg.max_bytes:
            return _Result(reason=DOWNLOAD_TOO_LARGE)
        body = _read_body(response, cfg.max_bytes + 1)
        if len(body) > cfg.max_bytes:
            return _Result(reason=DOWNLOAD_TOO_LARGE)
        if length is not None and len(body) < length:     # the server hung up mid-body
            return _Result(reason=DOWNLOAD_ERROR, retry=True)
        return _Result(body=body)


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body. ``read1`` returns after one socket read, so a
    body larger than ``limit`` is never held whole; the socket's deadline bounds the time."""
    parts, size = [], 0
    while size < limit:
        chunk = response.read1(min(1 << 16, limit - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _host(url: str) -> str | None:
    """The lower-case host of an http/https URL, or None for anything else."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return None
    return host if parts.scheme.lower() in _SCHEMES and host else None


__all__ = ["DOWNLOAD_BLOCKED", "DOWNLOAD_ERROR", "DOWNLOAD_HTTP_ERROR", "DOWNLOAD_REDIRECTS",
           "DOWNLOAD_TIMEOUT", "DOWNLOAD_TOO_LARGE", "REASONS",
           "ROBOTS_DIRECTIVES", "ROBOTS_DISALLOWED", "DownloadStage", "robots_disallowed"]
