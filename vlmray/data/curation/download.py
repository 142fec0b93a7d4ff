"""Download the images of URL-list rows: bounded retries, per-host limits, ``X-Robots-Tag``.

For each live row with a non-empty ``URL`` and no ``IMAGE``, :class:`DownloadStage` fetches the
URL (http/https only) on a thread pool made once per worker, at most ``per_host`` requests at a
time to one host, and stores the body in ``IMAGE``. Timeouts, connection errors and HTTP
5xx/429 are retried with exponential backoff; other 4xx are not. Failures become reject reasons;
results keep row order whatever order the requests finish in.

    batch = DownloadStage(DownloadConfig(threads=32, per_host=8))(batch)
"""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from vlmray.config.curation import DownloadConfig
from vlmray.data import schema
from vlmray.data.curation.stage import Batch, Resources, Stage, StageOutput, filled, num_rows

DOWNLOAD_TIMEOUT = "download_timeout"
DOWNLOAD_HTTP_ERROR = "download_http_error"
DOWNLOAD_ERROR = "download_error"
DOWNLOAD_TOO_LARGE = "download_too_large"
ROBOTS_DISALLOWED = "robots_disallowed"
REASONS = (DOWNLOAD_TIMEOUT, DOWNLOAD_HTTP_ERROR, DOWNLOAD_ERROR, DOWNLOAD_TOO_LARGE,
           ROBOTS_DISALLOWED)

ROBOTS_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "none"})
_ARGUMENT_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                  "max-video-preview"})   # "name: value", not "bot: directive"
_SCHEMES = ("http", "https")


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


def _error_result(err: BaseException | str) -> _Result:
    """An exception (or ``URLError.reason``) -> its reject reason and whether to retry."""
    if isinstance(err, TimeoutError):
        return _Result(reason=DOWNLOAD_TIMEOUT, retry=True)
    if isinstance(err, (socket.gaierror, http.client.InvalidURL)):
        return _Result(reason=DOWNLOAD_ERROR)            # DNS / bad URL: retrying won't help
    retry = isinstance(err, (ConnectionError, http.client.HTTPException))
    return _Result(reason=DOWNLOAD_ERROR, retry=retry)


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http/https only (urllib would also follow ftp)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        if urlsplit(newurl).scheme.lower() not in _SCHEMES:
            return None                                  # -> HTTPError on the 3xx
        return super().redirect_request(req, fp, code, msg, headers, newurl)


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
        self._opener = urllib.request.build_opener(_HttpRedirectsOnly())
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
        host = _host(url)
        if host is None:
            return _Result(reason=DOWNLOAD_ERROR)
        result = _Result()
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            with self._slot(host):
                result = self._attempt(url)
            if not result.retry:
                break
        return result

    def _attempt(self, url: str) -> _Result:
        request = urllib.request.Request(url, headers={"User-Agent": self.cfg.user_agent})
        deadline = time.monotonic() + self.cfg.deadline_s
        try:
            with self._opener.open(request, timeout=self.cfg.timeout_s) as response:
                return self._read(response, deadline)
        except urllib.error.HTTPError as e:
            e.close()
            return _Result(reason=DOWNLOAD_HTTP_ERROR, retry=e.code >= 500 or e.code == 429)
        except urllib.error.URLError as e:
            return _error_result(e.reason)
        except (OSError, http.client.HTTPException) as e:
            return _error_result(e)
        except (ValueError, OverflowError):      # a malformed URL, a port out of range
            return _Result(reason=DOWNLOAD_ERROR)

    def _read(self, response: Any, deadline: float) -> _Result:
        headers, cfg = response.headers, self.cfg
        if cfg.respect_robots_headers and robots_disallowed(
                headers.get_all("X-Robots-Tag") or [], cfg.bot_token):
            return _Result(reason=ROBOTS_DISALLOWED)
        declared = headers.get("Content-Length", "").strip()
        length = int(declared) if declared.isdigit() else None
        if length is not None and length > cfg.max_bytes:
            return _Result(reason=DOWNLOAD_TOO_LARGE)
        body = _read_body(response, cfg.max_bytes + 1, deadline)
        if body is None:
            return _Result(reason=DOWNLOAD_TIMEOUT, retry=True)
        if len(body) > cfg.max_bytes:
            return _Result(reason=DOWNLOAD_TOO_LARGE)
        if length is not None and len(body) < length:     # the server hung up mid-body
            return _Result(reason=DOWNLOAD_ERROR, retry=True)
        return _Result(body=body)


def _read_body(response: Any, limit: int, deadline: float) -> bytes | None:
    """Up to ``limit`` bytes of the body, or None when ``deadline`` (``time.monotonic``)
    passes first. ``read1`` returns after one socket read, so the deadline is checked
    however slowly the bytes come (``read(n)`` would wait for all ``n``)."""
    parts, size = [], 0
    while size < limit:
        chunk = response.read1(min(1 << 16, limit - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            return None
    return b"".join(parts)


def _host(url: str) -> str | None:
    """The lower-case host of an http/https URL, or None for anything else."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return None
    return host if parts.scheme.lower() in _SCHEMES and host else None


__all__ = ["DOWNLOAD_ERROR", "DOWNLOAD_HTTP_ERROR", "DOWNLOAD_TIMEOUT", "DOWNLOAD_TOO_LARGE",
           "REASONS", "ROBOTS_DIRECTIVES", "ROBOTS_DISALLOWED", "DownloadStage",
           "robots_disallowed"]
