"""A real S3 endpoint for tests: moto's threaded server on 127.0.0.1.

Fixtures:
    s3_server  (session)  -> endpoint URL; sets AWS_ENDPOINT_URL and fake credentials.
    s3_bucket  (function) -> ``"s3://<fresh bucket>"`` on that server.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["s3_server", "s3_bucket"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clear_s3fs_cache() -> None:
    """Forget cached S3FileSystem instances, which would otherwise outlive an endpoint."""
    try:
        import s3fs
    except ImportError:  # pragma: no cover
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's server on a free port and point the AWS environment at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        _clear_s3fs_cache()
        try:
            yield endpoint
        finally:
            _clear_s3fs_cache()
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, uniquely named bucket on the moto server, as ``"s3://<bucket>"``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    _clear_s3fs_cache()
    yield f"s3://{name}"
    _clear_s3fs_cache()
