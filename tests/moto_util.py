"""Real object store servers on 127.0.0.1 for the object storage tests: S3 (moto) and
Google Cloud Storage (gcp-storage-emulator), each reached through TensorStore's own
driver, as in production."""

from __future__ import annotations

import contextlib
import json
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


def moto_server():
    """Runs ``python -m moto.server`` on a free 127.0.0.1 port; yields (endpoint, port)."""
    return _serve(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                "-p", str(port)])


@contextlib.contextmanager
def _serve(command):
    """Runs ``command(port)`` for a free 127.0.0.1 port until it answers HTTP; yields
    (endpoint, port), and stops it after."""
    port = free_port()
    server = subprocess.Popen(command(port), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, server)
        yield url, port
    finally:
        server.terminate()
        server.wait(timeout=30)


def environment(endpoint: str, **extra: str):
    """Puts the S3 endpoint, credentials and ``extra`` in os.environ (mpiexec workers
    inherit it), and restores what was there."""
    return environment_of({**ENV, "DCHECKPOINT_S3_ENDPOINT": endpoint, **extra})


@contextlib.contextmanager
def environment_of(values: dict):
    """Puts ``values`` in os.environ for the duration, then restores what was there."""
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


def make_bucket(endpoint: str, scheme: str = "s3") -> str:
    """A fresh bucket, created with a plain HTTP request (no cloud SDK needed); its URL."""
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    if scheme == "gs":
        request = urllib.request.Request(
            f"{endpoint}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"})
    else:
        request = urllib.request.Request(f"{endpoint}/{name}", method="PUT")
    urllib.request.urlopen(request, timeout=30).close()
    return f"{scheme}://{name}"


def gcs_server():
    """Runs gcp-storage-emulator (in memory, listing ranges honoured: see
    gcs_emulator.py) on a free 127.0.0.1 port; yields (endpoint, port)."""
    emulator = os.path.join(os.path.dirname(__file__), "gcs_emulator.py")
    return _serve(lambda port: [sys.executable, emulator, str(port)])


# TensorStore's gcs driver: the endpoint, and a fixed token (the emulator checks none).
def gcs_environment(endpoint: str):
    return environment_of({"TENSORSTORE_GCS_HTTP_URL": endpoint,
                           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"})


@contextlib.contextmanager
def object_store(scheme: str):
    """A running server of ``scheme`` ("s3" or "gs") with its environment set; yields
    its endpoint."""
    if scheme == "gs":
        with gcs_server() as (url, _), gcs_environment(url):
            yield url
    else:
        with moto_server() as (url, _), environment(url):
            yield url


def _wait_until_serving(endpoint: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"object store server exited with {server.returncode}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (an error status for "/" is still an answer)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise RuntimeError(f"object store server at {endpoint} did not answer within 60 s")
