"""An S3-protocol server on loopback (moto in server mode) for tests of object-storage paths."""
from __future__ import annotations

import urllib.request

import pytest


@pytest.fixture
def s3(monkeypatch):
    """A fresh S3 server with a bucket ``crawl``; the standard AWS environment points at it. Yields an s3fs
    filesystem to look at the bucket with."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    # moto keeps its buckets in the process: start every test from an empty store
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    fs.mkdir("crawl")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
