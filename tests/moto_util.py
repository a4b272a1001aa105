"""A real S3-compatible server (moto) on 127.0.0.1 for the object storage tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

# Dummy credentials and region; the endpoint goes in DCHECKPOINT_S3_ENDPOINT.
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """Runs ``python -m moto.server`` on a free 127.0.0.1 port; yields (endpoint, port)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, server)
        yield url, port
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def environment(endpoint: str, **extra: str):
    """Puts the endpoint, credentials and ``extra`` in os.environ (mpiexec workers
    inherit it), and restores what was there."""
    values = {**ENV, "DCHECKPOINT_S3_ENDPOINT": endpoint, **extra}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_bucket(endpoint: str) -> str:
    """A fresh bucket, created with a plain HTTP PUT (no AWS SDK needed); its URL."""
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"{endpoint}/{name}", method="PUT")
    urllib.request.urlopen(request, timeout=30).close()
    return f"s3://{name}"


def _wait_until_serving(endpoint: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited with {server.returncode}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise RuntimeError(f"moto server at {endpoint} did not answer within 60 s")
