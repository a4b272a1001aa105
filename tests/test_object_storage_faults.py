"""S3 and GCS checkpoints through a fault-injecting proxy (tests/fault_proxy.py) in front
of moto and gcp-storage-emulator.

The proxy answers HTTP 500, drops connections before forwarding, forwards a request and
then loses its response, or stalls, for the requests a test picks. Each test saves
ckpt-1 cleanly, injects faults while ckpt-2 is saved or restored, and checks that the
save commits and restores bit-identically, or fails within its timeout with a
`StorageTimeoutError` (or a `CheckpointError` carrying it) naming the operation and
path, while ckpt-1 stays the latest checkpoint and restores bit-identically.

TensorStore's S3 and GCS retry backoffs are shortened through DCHECKPOINT_TENSORSTORE_CONTEXT
(its default starts at 1 s) so that retried requests finish in milliseconds.
"""

import json
import re
import time
from urllib.parse import parse_qs, unquote

import numpy as np
import pytest

import dcheckpoint
from dcheckpoint import _tensorstore as tsio
from dcheckpoint._storage import open_storage
from dcheckpoint.errors import CheckpointError, StorageTimeoutError
from tests.fault_proxy import FaultProxy
from tests.moto_util import (
    environment,
    environment_of,
    gcs_environment,
    gcs_server,
    make_bucket,
    moto_server,
)
from tests.mp_util import REPO_ROOT, results, run_launch

_RETRIES = {"max_retries": 32, "initial_delay": "10ms", "max_delay": "100ms"}
FAST_RETRIES = {"s3_request_retries": _RETRIES, "gcs_request_retries": _RETRIES}
WORKER = REPO_ROOT / "tests" / "workers" / "s3_worker.py"
STALL_SECS = 120  # far longer than any timeout here: a save that waited for it failed
TIMEOUT_SECS = 2.0


@pytest.fixture(scope="module", params=["s3", "gs"])
def servers(request):
    scheme = request.param
    server = gcs_server if scheme == "gs" else moto_server
    with server() as (url, port), FaultProxy(port) as proxy, \
            environment_of({tsio.CONTEXT_VARIABLE: json.dumps(FAST_RETRIES)}), \
            (gcs_environment if scheme == "gs" else environment)(proxy.endpoint):
        saved_context = tsio._CONTEXT
        tsio._CONTEXT = None  # re-read with the fast retries
        try:
            yield url, proxy, scheme
        finally:
            tsio._CONTEXT = saved_context


@pytest.fixture
def proxy(servers):
    _, proxy, _ = servers
    proxy.reset()
    yield proxy
    proxy.heal()


@pytest.fixture
def directory(servers):
    url, _, scheme = servers
    return f"{make_bucket(url, scheme)}/run"


def values(step: int) -> dict:
    return {"w": np.arange(96, dtype=np.float32).reshape(12, 8) * step,
            "b": np.full((5,), step, np.int32)}


def manager(directory: str, step: int) -> dcheckpoint.CheckpointManager:
    """A fresh manager of ``directory`` whose variables hold ``values(step)``."""
    variables = {k: dcheckpoint.Variable(v) for k, v in values(step).items()}
    return dcheckpoint.CheckpointManager(dcheckpoint.Checkpoint(**variables), directory,
                                         max_to_keep=3)


def save(manager_, step: int, *, timeout_secs: float = 60.0) -> str:
    return manager_.save(checkpoint_number=step,
                         options=dcheckpoint.CheckpointOptions(timeout_secs=timeout_secs))


def save_step(directory: str, step: int) -> str:
    return save(manager(directory, step), step)


def assert_restores(path: str, step: int) -> None:
    restored = dcheckpoint.restore_pytree(path, {"w": None, "b": None})
    for name, want in values(step).items():
        np.testing.assert_array_equal(restored[name], want)
        assert restored[name].dtype == want.dtype


def object_of(r) -> str:
    """The object a request names, as ``/bucket/key`` for S3 (the path) and for GCS
    (whose JSON API names it in ``?name=`` for an upload, after ``/o/`` otherwise)."""
    path, _, query = r.path.partition("?")
    if "/storage/v1/b/" not in path:
        return unquote(path)
    bucket, _, rest = path.split("/storage/v1/b/", 1)[1].partition("/o")
    return f"/{bucket}/" + parse_qs(query).get("name", [unquote(rest.lstrip("/"))])[0]


def is_write(r) -> bool:
    """An object write: S3's PUT, GCS's upload POST."""
    return r.method == "PUT" or (r.method == "POST" and "uploadType=" in r.path)


def put(pattern: str):
    """Matches writes of objects whose key contains ``pattern``; ``DATA`` stands for the
    save's own data directory (``data-<save id>``, see docs/FORMAT.md)."""
    regex = re.compile(re.escape(pattern).replace("DATA", "data-[0-9a-f]+"))
    return lambda r: is_write(r) and regex.search(object_of(r)) is not None


ARRAY_NODE = put("/ckpt-2/DATA/w/zarr.json")


@pytest.mark.parametrize("which", [
    pytest.param(ARRAY_NODE, id="array zarr.json (create-if-absent before)"),
    pytest.param(put("/ckpt-2/DATA/w/c/"), id="chunk"),
    pytest.param(put("/ckpt-2/zarr.json"), id="group node"),
    pytest.param(put("/ckpt-2/dcheckpoint.json"), id="commit marker"),
    pytest.param(put("/run/checkpoint"), id="state file"),
])
def test_a_write_whose_response_was_lost_is_retried_and_the_save_commits(
        proxy, directory, which):
    save_step(directory, 1)
    second = manager(directory, 2)
    proxy.lose_response(1, match=which)
    path = save(second, 2)
    assert proxy.fired["lose_response"] == 1  # the server applied it; we never heard back
    assert dcheckpoint.latest_checkpoint(directory) == path == f"{directory}/ckpt-2"
    assert_restores(path, 2)
    assert_restores(f"{directory}/ckpt-1", 1)


def test_errors_and_dropped_connections_during_a_commit_are_retried(proxy, directory):
    save_step(directory, 1)
    second = manager(directory, 2)
    proxy.fail(6)
    proxy.drop(4)
    proxy.lose_response(2, match=ARRAY_NODE)
    path = save(second, 2)
    assert dict(proxy.fired) == {"fail": 6, "drop": 4, "lose_response": 2}
    assert dcheckpoint.latest_checkpoint(directory) == path
    assert_restores(path, 2)


def test_errors_that_outlast_the_timeout_fail_cleanly_and_a_later_save_works(
        proxy, directory):
    save_step(directory, 1)
    second = manager(directory, 2)
    proxy.fail(1 << 30, match=is_write)
    with pytest.raises(CheckpointError) as caught:
        save(second, 2, timeout_secs=TIMEOUT_SECS)
    assert "storage did not answer within 2 s" in str(caught.value)
    assert f"{directory}/ckpt-2" in str(caught.value)
    assert proxy.fired["fail"] > 1  # retried until the bound, not given up at once
    proxy.heal()
    assert dcheckpoint.latest_checkpoint(directory) == f"{directory}/ckpt-1"
    assert_restores(f"{directory}/ckpt-1", 1)
    # The server is back: the same job saves again.
    assert save(second, 3) == f"{directory}/ckpt-3"
    assert_restores(f"{directory}/ckpt-3", 2)  # the values this manager holds


@pytest.mark.parametrize("which,operation", [
    pytest.param(lambda r: True, "uncommitting", id="every request"),
    pytest.param(put("/ckpt-2/DATA/w/c/"), "writing this process's chunks", id="chunk writes"),
    pytest.param(ARRAY_NODE, "writing the arrays' zarr.json", id="commit"),
])
def test_a_stalled_server_fails_the_save_within_its_timeout(
        proxy, directory, which, operation):
    save_step(directory, 1)
    second = manager(directory, 2)
    proxy.stall(STALL_SECS, match=which)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        save(second, 2, timeout_secs=TIMEOUT_SECS)
    waited = time.monotonic() - start
    proxy.heal()
    assert proxy.fired["stall"] >= 1
    assert waited < STALL_SECS / 2  # gave up on its own, did not wait for the server
    error = caught.value
    assert isinstance(error, StorageTimeoutError) or isinstance(
        error.__cause__, StorageTimeoutError)
    assert operation in str(error) and f"{directory}/ckpt-2" in str(error)
    assert "within 2 s" in str(error)
    assert dcheckpoint.latest_checkpoint(directory) == f"{directory}/ckpt-1"
    assert_restores(f"{directory}/ckpt-1", 1)


def test_a_late_write_of_a_failed_save_cannot_overwrite_the_next_save_to_that_name(
        proxy, directory):
    """The failed save's stalled commit marker reaches the server after it gave up.

    A new save to the same name waits for that write before it writes, instead of
    letting the old marker land on top of the new checkpoint (old metadata, naming an
    array the new save does not have, over new chunks). Chunk writes are ordered by
    TensorStore's own cache within a process; plain object writes are not.
    """
    save_step(directory, 1)
    failing, retry = manager(directory, 2), manager(directory, 5)
    failing.checkpoint.extra = dcheckpoint.Variable(np.ones((3,), np.float32))
    released = time.monotonic() + 3 * TIMEOUT_SECS
    proxy.stall(3 * TIMEOUT_SECS, match=put("/ckpt-2/dcheckpoint.json"), count=1)
    with pytest.raises(StorageTimeoutError, match="writing .*ckpt-2/dcheckpoint.json"):
        save(failing, 2, timeout_secs=TIMEOUT_SECS)
    assert proxy.fired["stall"] == 1
    # Same name at once, other arrays, while the old marker's PUT is still held.
    path = save(retry, 2, timeout_secs=10 * TIMEOUT_SECS)
    time.sleep(max(0.0, released - time.monotonic()) + 1.0)  # the held PUT is through
    marker = [is_write(r) for r in proxy.requests
              if object_of(r).endswith("/ckpt-2/dcheckpoint.json")]
    assert marker.count(True) == 2  # the old one was held, then went through
    assert sorted(dcheckpoint.read_metadata(path).arrays) == ["b", "save_counter", "w"]
    assert_restores(path, 5)


def test_a_late_state_file_write_cannot_replace_a_newer_one(proxy, directory, monkeypatch):
    """The manager's state file PUT of save 2 is held past its bound, then released."""
    monkeypatch.setenv(tsio.TIMEOUT_VARIABLE, str(TIMEOUT_SECS))  # the manager's own I/O
    save_step(directory, 1)
    second = manager(directory, 2)
    # Held past the bound, released before the next save's own bound runs out.
    released = time.monotonic() + 1.5 * TIMEOUT_SECS
    proxy.stall(1.5 * TIMEOUT_SECS, match=put("/run/checkpoint"), count=1)
    with pytest.raises(CheckpointError, match="writing .*/run/checkpoint"):
        save(second, 2)
    assert proxy.fired["stall"] == 1
    assert save(second, 3) == f"{directory}/ckpt-3"  # waits for the held PUT first
    time.sleep(max(0.0, released - time.monotonic()) + 1.0)
    assert dcheckpoint.latest_checkpoint(directory) == f"{directory}/ckpt-3"
    assert_restores(f"{directory}/ckpt-3", 2)


def test_two_processes_save_through_errors_drops_and_lost_responses(proxy, directory):
    """tests/workers/s3_worker.py: 3 saves with retention on (4, 2), then a restore
    onto (2, 4), each process a separate client of the faulty proxy."""
    proxy.fail(8)
    proxy.drop(4)
    proxy.lose_response(6, match=lambda r: is_write(r) or r.method == "DELETE")
    saved = results(run_launch(WORKER, "save", directory, "4x2", processes=2,
                               devices_per_process=4))
    assert dict(proxy.fired) == {"fail": 8, "drop": 4, "lose_response": 6}
    assert [(r["checkpoints"], r["latest"]) for r in saved] == [
        (["ckpt-2", "ckpt-3"], f"{directory}/ckpt-3")] * 2
    restored = results(run_launch(WORKER, "restore", directory, "2x4", processes=2,
                                  devices_per_process=4))
    assert [(r["restored"], r["bad"], r["checked"]) for r in restored] == [
        (f"{directory}/ckpt-3", [], 4)] * 2


@pytest.mark.parametrize("which,operation", [
    pytest.param(lambda r: r.method == "GET", "looking up", id="metadata"),
    pytest.param(lambda r: r.method == "GET" and "/w/c/" in object_of(r), "reading array 'w'",
                 id="chunk reads"),
])
def test_a_stalled_server_fails_a_restore_within_the_storage_timeout(
        servers, proxy, directory, monkeypatch, which, operation):
    path = save_step(directory, 1)
    monkeypatch.setenv(tsio.TIMEOUT_VARIABLE, str(TIMEOUT_SECS))
    proxy.stall(STALL_SECS, match=which)
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError, match=operation) as caught:
        dcheckpoint.restore_pytree(path, {"w": None, "b": None})
    assert time.monotonic() - start < STALL_SECS / 2
    assert path in str(caught.value)
    proxy.heal()
    if servers[2] == "gs":
        # The emulator answers a released chunk read in a way TensorStore's gcs cache
        # then takes for "Malformed StorageGeneration"; a new context reads it afresh.
        monkeypatch.setattr(tsio, "_CONTEXT", None)
    assert_restores(path, 1)


def test_small_object_operations_are_bounded_by_the_storage_timeout(proxy, directory):
    storage = open_storage(directory, timeout_secs=TIMEOUT_SECS)
    storage.write_bytes_atomic("a/b", b"x")
    proxy.stall(STALL_SECS)
    for call, operation in [
        (lambda: storage.read_bytes("a/b", max_bytes=10), "reading"),
        (lambda: storage.write_bytes_atomic("a/b", b"y"), "writing"),
        (lambda: storage.list_dir(), "listing"),
        (lambda: storage.exists("a"), "looking up"),
    ]:
        with pytest.raises(StorageTimeoutError, match=re.escape(f"{operation} {directory}")):
            call()
    proxy.heal()
    assert storage.read_bytes("a/b", max_bytes=10) in (b"x", b"y")  # the stalled PUT may land


@pytest.mark.parametrize("variable,value", [
    (tsio.TIMEOUT_VARIABLE, "0"), (tsio.TIMEOUT_VARIABLE, "soon"),
    (tsio.TIMEOUT_VARIABLE, "inf"), (tsio.CONTEXT_VARIABLE, "[1]"),
    (tsio.CONTEXT_VARIABLE, '{"s3_request_retries": {"max_retries": "many"}}'),
])
def test_bad_storage_settings_are_refused_by_name(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(tsio, "_CONTEXT", None)
    with pytest.raises(ValueError, match=variable):
        (tsio.default_timeout_secs if variable == tsio.TIMEOUT_VARIABLE else tsio.context)()
