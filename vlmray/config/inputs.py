"""How inputs are read and fetched: the reader's formats, columns and limits (:class:`ReadConfig`)
and the downloader of URL lists (:class:`DownloadConfig`), shared by the curation, rewrite and
index jobs and by training.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

InputFormat = Literal["auto", "webdataset", "parquet", "urls"]

FORMATS: tuple[str, ...] = get_args(InputFormat)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(kw_only=True)


class ReadConfig:
    """How input files are read; column names left empty are detected from common names."""

    format: InputFormat = "auto"
    """``auto`` (from the extension: ``.tar`` webdataset, ``.parquet`` parquet, ``.csv``/
    ``.tsv``/``.jsonl``/``.txt`` URL lists; a parquet with a URL column and no image column is
    a URL list), or force ``webdataset``, ``parquet`` or ``urls``."""
    key_column: str = ""
    """Table column holding the sample key ("" = ``key``, ``__key__`` or ``id``; when absent a
    stable key is derived from the file and row index)."""
    image_column: str = ""
    """Table column holding encoded image bytes ("" = ``image``, ``jpg``, ``jpeg``, ``png``,
    ``webp``, ``img`` or ``image_bytes``); string values are read as image paths."""
    image_path_column: str = ""
    """Table column holding image paths, relative to the table's directory (absolute paths
    and URIs only with ``allow_absolute_paths``) ("" = ``image_path``, ``file_name``,
    ``filename`` or ``path``, when no image column)."""
    text_column: str = ""
    """Table column holding the caption ("" = ``caption``, ``text``, ``txt``, ``alt`` or
    ``TEXT``)."""
    url_column: str = ""
    """Table column holding the image URL ("" = ``url``, ``URL`` or ``image_url``)."""
    meta_column: str = ""
    """Table column holding a JSON sidecar ("" = ``json`` or ``meta``)."""
    allow_absolute_paths: bool = False
    """Also read image paths that are absolute (``/data/x.jpg``) or storage URIs (``s3://``,
    ``gs://``, ``file://``...). Off: only paths relative to the table's folder, inside it; any
    other path is rejected (``image_path_outside_input``), so a table can only point at data
    next to it. ``http(s)://`` paths are never read here (``url_belongs_in_url_column``): URLs
    belong in the URL column, where the downloader fetches them with its checks."""
    max_bytes: int = 20_000_000
    """Largest image file or tar member read, in bytes (as ``download.max_bytes`` is for
    downloads): a larger one is rejected (``file_too_large``) from its size, before it is
    read, so one huge or endless file cannot exhaust a reader's memory."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"read.format {self.format!r}: valid: {', '.join(FORMATS)}")
        if not isinstance(self.allow_absolute_paths, bool):  # config errors are all ValueError
            raise ValueError(  # noqa: TRY004
                f"read.allow_absolute_paths must be true or false, got "
                f"{self.allow_absolute_paths!r}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) \
                or self.max_bytes <= 0:
            raise ValueError(f"read.max_bytes must be an integer > 0 (bytes), "
                             f"got {self.max_bytes!r}")
        for f in fields(self):
            if f.name.endswith("_column") and not isinstance(getattr(self, f.name), str):
                raise TypeError(f"read.{f.name} must be a column name (str), "
                                f"got {getattr(self, f.name)!r}")
        if self.image_column and self.image_path_column:
            raise ValueError("set read.image_column (bytes) or read.image_path_column (paths), "
                             "not both")


@dataclass(kw_only=True)


class DownloadConfig:
    """How URL-list images are fetched."""

    timeout_s: float = 10.0
    """Seconds to wait to connect and for each read of the response."""
    deadline_s: float = 60.0
    """Most seconds one URL's download may take in all (connecting, headers, body, redirects,
    retries and the waits between them): a server that trickles bytes just faster than
    ``timeout_s`` is cut off here (``download_timeout``) instead of holding a download
    thread, and the batch waiting on it, for as long as it likes."""
    retries: int = 2
    """Extra attempts after a timeout, connection error or HTTP 5xx/429 (never other 4xx)."""
    backoff_s: float = 0.5
    """Wait before retry ``k`` (1-based): ``backoff_s * 2 ** (k - 1)`` seconds."""
    threads: int = 16
    """Concurrent requests per worker."""
    per_host: int = 4
    """Most concurrent requests to one host within a worker."""
    max_bytes: int = 20_000_000
    """Larger bodies are rejected as ``download_too_large``."""
    user_agent: str = "vlmray/0.1 (image-text curation)"
    """``User-Agent`` header; its first token (``vlmray``) is our bot name for X-Robots-Tag."""
    respect_robots_headers: bool = True
    """Reject responses whose ``X-Robots-Tag`` says ``noai``, ``noimageai``, ``noindex`` or
    ``none`` for all bots or for ours."""
    max_redirects: int = 5
    """Most redirects followed per attempt; one more is ``download_too_many_redirects``. Each
    hop's address is checked again, so a public URL cannot redirect into the cluster."""
    retry_after_max_s: float = 30.0
    """A 429/503's ``Retry-After`` (seconds or a date) is waited before the next attempt, up
    to this; a server asking for longer is not retried (``download_http_error``)."""
    allow_private: bool = False
    """Also fetch from loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), shared
    (100.64/10) and other non-public addresses. Off: a URL whose host resolves only there is
    ``download_blocked``, so a URL list cannot reach services inside the cluster. Link-local
    and cloud-metadata addresses (169.254.169.254, fd00:ec2::254, ...) stay blocked unless a
    network in ``allow_hosts`` names them."""
    allow_hosts: list[str] = field(default_factory=list)
    """Hosts fetched even at a private address: exact host names (``mirror.internal``, not
    redirected-to names that are not listed) and IP addresses or networks (``10.1.2.3``,
    ``10.0.0.0/8``, ``127.0.0.1`` for a local test server), for a private mirror."""

    def __post_init__(self) -> None:
        positive = {"timeout_s": self.timeout_s, "deadline_s": self.deadline_s,
                    "threads": self.threads,
                    "per_host": self.per_host, "max_bytes": self.max_bytes}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"download.{name} must be > 0, got {value!r}")
        for name, value in {"retries": self.retries, "backoff_s": self.backoff_s,
                            "max_redirects": self.max_redirects,
                            "retry_after_max_s": self.retry_after_max_s}.items():
            if not value >= 0:
                raise ValueError(f"download.{name} must be >= 0, got {value!r}")
        if not self.user_agent.strip():
            raise ValueError("download.user_agent must be non-empty")
        if not isinstance(self.allow_private, bool):
            raise ValueError(f"download.allow_private must be true or false, "  # noqa: TRY004
                             f"got {self.allow_private!r}")
        self.allow_networks()                       # every allow_hosts entry parses

    def allow_networks(self) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
        """``allow_hosts`` split into lower-case host names and IP networks."""
        if not isinstance(self.allow_hosts, list):
            raise ValueError(f"download.allow_hosts must be a list of host names, "  # noqa: TRY004
                             f"addresses or networks, got {self.allow_hosts!r}")
        names, networks = set(), []
        for entry in self.allow_hosts:
            text = entry.strip().lower().rstrip(".") if isinstance(entry, str) else ""
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", text):
                raise ValueError(f"download.allow_hosts: {entry!r} is not a host name, an IP "
                                 "address or a network (10.0.0.0/8)")
            names.add(text)
        return frozenset(names), tuple(networks)

    @property
    def bot_token(self) -> str:
        """Our name in ``X-Robots-Tag: <bot>: <directive>``: the user agent's first token."""
        return self.user_agent.split()[0].split("/")[0].lower()


__all__ = ["FORMATS", "DownloadConfig", "IPNetwork", "InputFormat", "ReadConfig"]
