"""Checkpoints on S3 and GCS, against real servers started on 127.0.0.1: moto for S3,
gcp-storage-emulator for GCS (TensorStore's gcs driver pointed at it through
TENSORSTORE_GCS_HTTP_URL). Every test runs on both.

Object stores cannot rename: a save writes into its final prefix and the metadata file,
written last, is the commit marker. These tests check that through the public API, in
one process and in a 2-process job: save, restore onto another mesh, manager retention,
and a save that crashed before its marker.
"""

import json

import jax
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint._cli import main
from dcheckpoint._metadata import METADATA_FILE
from dcheckpoint._storage import ObjectStorage, open_storage
from dcheckpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from tests.moto_util import make_bucket, object_store
from tests.mp_util import REPO_ROOT, results, run_launch

WORKER = REPO_ROOT / "tests" / "workers" / "s3_worker.py"


@pytest.fixture(scope="module", params=["s3", "gs"])
def scheme(request):
    return request.param


@pytest.fixture(scope="module")
def endpoint(scheme):
    """An S3 (moto) or GCS (gcp-storage-emulator) server; its endpoint and dummy
    credentials are put in the environment, where the library (and the mpiexec
    workers, which inherit it) read them."""
    with object_store(scheme) as url:
        yield url


@pytest.fixture
def bucket(endpoint, scheme):
    return make_bucket(endpoint, scheme)


def _sharded(mesh, spec, values):
    return jax.make_array_from_callback(values.shape, NamedSharding(mesh, spec),
                                        lambda idx: values[idx])


def _mesh(shape):
    count = int(np.prod(shape))
    return jax.make_mesh(shape, ("x", "y"), devices=jax.devices()[:count])


def test_save_then_restore_onto_another_mesh(bucket):
    values = np.arange(128, dtype=np.float32).reshape(16, 8)
    saved = _sharded(_mesh((4, 2)), P("x", "y"), values)
    path = dcheckpoint.save_pytree(f"{bucket}/run/one", {"w": saved, "step": np.int32(7)})
    assert path == f"{bucket}/run/one"

    target = NamedSharding(_mesh((2, 2)), P("y", "x"))
    restored = dcheckpoint.restore_pytree(path, {"w": target, "step": None})
    assert restored["w"].sharding == target
    np.testing.assert_array_equal(np.asarray(restored["w"]), values)
    assert int(restored["step"]) == 7
    # One object per chunk: (16, 8) on (4, 2) is 4 x 2 chunks of (4, 4).
    w = dcheckpoint.read_metadata(path).arrays["w"].storage_path  # data-<save id>/w
    assert open_storage(path).list_dir(f"{w}/c") == ["0", "1", "2", "3"]


def test_each_array_is_plain_zarr_readable_without_this_library(bucket, endpoint, scheme):
    values = np.arange(12, dtype=np.int32).reshape(3, 4)
    path = dcheckpoint.save_pytree(f"{bucket}/plain", {"a": values})
    a = dcheckpoint.read_metadata(path).arrays["a"].storage_path  # data-<save id>/a
    name = bucket.split("://")[1]
    kvstore = ({"driver": "s3", "bucket": name, "path": f"plain/{a}/", "endpoint": endpoint,
                "aws_region": "us-east-1"} if scheme == "s3" else
               {"driver": "gcs", "bucket": name, "path": f"plain/{a}/"})
    spec = {"driver": "zarr3", "kvstore": kvstore}
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), values)
    meta = json.loads(open_storage(path).read_bytes(METADATA_FILE, max_bytes=1 << 20))
    assert meta["checkpoint"]["arrays"]["a"]["shape"] == [3, 4]


def test_checkpoint_object_api_round_trip(bucket):
    weights = dcheckpoint.Variable(np.full((4, 2), 3.0, np.float32))
    checkpoint = dcheckpoint.Checkpoint(weights=weights)
    path = checkpoint.save(f"{bucket}/obj/ckpt")
    assert path == f"{bucket}/obj/ckpt-1"
    weights.assign(np.zeros((4, 2), np.float32))
    checkpoint.restore(path).assert_consumed()
    np.testing.assert_array_equal(np.asarray(weights.value), np.full((4, 2), 3.0))
    assert int(checkpoint.save_counter.value) == 1


def test_manager_retention_deletes_old_prefixes_and_a_new_manager_continues(bucket):
    directory = f"{bucket}/managed"
    weights = dcheckpoint.Variable(np.zeros((8,), np.float32))
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(weights=weights), directory, max_to_keep=2)
    for step in range(1, 5):
        weights.assign(np.full((8,), step, np.float32))
        manager.save()
    assert manager.checkpoints == [f"{directory}/ckpt-3", f"{directory}/ckpt-4"]
    assert open_storage(directory).list_dir() == ["checkpoint", "ckpt-3", "ckpt-4"]
    assert dcheckpoint.latest_checkpoint(directory) == f"{directory}/ckpt-4"
    state = dcheckpoint.get_checkpoint_state(directory)
    assert state.all_model_checkpoint_paths == (f"{directory}/ckpt-3", f"{directory}/ckpt-4")

    weights2 = dcheckpoint.Variable(np.zeros((8,), np.float32))
    successor = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(weights=weights2), directory, max_to_keep=2)
    assert successor.restore_or_initialize() == f"{directory}/ckpt-4"
    np.testing.assert_array_equal(np.asarray(weights2.value), np.full((8,), 4.0))
    assert successor.save() == f"{directory}/ckpt-5"
    assert open_storage(directory).list_dir() == ["checkpoint", "ckpt-4", "ckpt-5"]


def test_a_save_that_crashed_before_its_marker_is_ignored_then_cleaned(bucket):
    directory = f"{bucket}/crash"
    weights = dcheckpoint.Variable(np.ones((4,), np.float32))
    checkpoint = dcheckpoint.Checkpoint(weights=weights)
    manager = dcheckpoint.CheckpointManager(checkpoint, directory, max_to_keep=3)
    manager.save()
    # A save of ckpt-2 that wrote all its objects but died before the marker: the
    # state file was never updated, and the prefix holds chunks and zarr.json only.
    crashed = checkpoint.write(f"{directory}/ckpt-2")
    assert open_storage(crashed).remove(METADATA_FILE) is True
    assert "zarr.json" in open_storage(crashed).list_dir()

    assert dcheckpoint.latest_checkpoint(directory) == f"{directory}/ckpt-1"
    with pytest.raises(CheckpointNotFoundError, match=r"_METADATA: an interrupted save"):
        checkpoint.restore(crashed)

    successor = dcheckpoint.CheckpointManager(checkpoint, directory, max_to_keep=3)
    assert "ckpt-2" not in open_storage(directory).list_dir()  # cleaned at start
    assert successor.checkpoints == [f"{directory}/ckpt-1"]


def test_a_crashed_prefix_is_overwritten_by_the_next_save(bucket):
    path = f"{bucket}/again"
    dcheckpoint.save_pytree(path, {"a": np.zeros((6,), np.float32), "b": np.int32(1)})
    open_storage(path).remove(METADATA_FILE)
    with pytest.raises(CheckpointNotFoundError):
        dcheckpoint.restore_pytree(path, {"a": None})

    dcheckpoint.save_pytree(path, {"a": np.arange(6, dtype=np.float32)})
    restored = dcheckpoint.restore_pytree(path, {"a": None})
    np.testing.assert_array_equal(restored["a"], np.arange(6, dtype=np.float32))
    assert sorted(dcheckpoint.read_metadata(path).arrays) == ["a"]


def test_keys_that_leave_the_prefix_are_refused():
    storage = ObjectStorage("s3://bucket/run/ckpt-1")
    assert storage.resolve_inside("model/w") == "s3://bucket/run/ckpt-1/model/w"
    for bad in ["../ckpt-2/w", "model/../../x", "/abs", "a//b", "./a", "a\\..\\b"]:
        with pytest.raises(CorruptCheckpointError, match="inside|component"):
            storage.resolve_inside(bad)
    with pytest.raises(ValueError, match="expected a local path, s3://bucket/prefix"):
        open_storage("ftp://host/x")
    with pytest.raises(ValueError, match="component"):
        open_storage("s3://bucket/a/../b")
    spec = open_storage("gs://b/run/").kvstore_spec("w")
    assert spec == {"driver": "gcs", "bucket": "b", "path": "run/w/"}


def test_two_processes_save_with_retention_and_restore_on_other_meshes(bucket):
    url = f"{bucket}/mp"
    saved = results(run_launch(WORKER, "save", url, "4x2", processes=2,
                               devices_per_process=4))
    assert [(r["checkpoints"], r["latest"]) for r in saved] == [
        (["ckpt-2", "ckpt-3"], f"{url}/ckpt-3")] * 2
    assert open_storage(url).list_dir() == ["checkpoint", "ckpt-2", "ckpt-3"]

    restored = results(run_launch(WORKER, "restore", url, "2x4", processes=2,
                                  devices_per_process=4))
    assert [(r["restored"], r["bad"], r["checked"], r["same_sharding"]) for r in restored] \
        == [(f"{url}/ckpt-3", [], 4, True)] * 2
    # And in this single process, onto 8 devices in yet another layout.
    target = NamedSharding(_mesh((8, 1)), P("x"))
    values = dcheckpoint.restore_pytree(f"{url}/ckpt-3", {"weights": target})["weights"]
    want = np.arange(128, dtype=np.float32).reshape(16, 8) + 3000
    np.testing.assert_array_equal(np.asarray(values), want)


def test_command_line_lists_and_inspects_s3(bucket, capsys):
    directory = f"{bucket}/cli"
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.zeros((2, 3), np.float32))),
        directory, max_to_keep=2)
    for _ in range(3):
        manager.save()
    assert main(["ls", directory, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["latest"]) for r in out["checkpoints"]] == [
        ("ckpt-2", False), ("ckpt-3", True)]
    assert main(["inspect", f"{directory}/ckpt-3", "--json"]) == 0
    arrays = {a["path"]: a for a in json.loads(capsys.readouterr().out)["arrays"]}
    assert (arrays["w"]["shape"], arrays["w"]["bytes"]) == ([2, 3], 24)
    assert main(["inspect", f"{directory}/ckpt-1"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_command_line_verify_on_s3_finds_a_flipped_byte_and_a_missing_chunk(bucket, capsys):
    values = np.arange(32, dtype=np.float32).reshape(8, 4)
    path = dcheckpoint.save_pytree(
        f"{bucket}/verify", {"w": _sharded(_mesh((4, 2)), P("x", "y"), values)})
    assert main(["verify", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["arrays_checked"], out["chunks_checked"]) == (True, 1, 8)

    storage = open_storage(path)
    w = dcheckpoint.read_metadata(path).arrays["w"].storage_path  # data-<save id>/w
    data = bytearray(storage.read_bytes(f"{w}/c/1/0", max_bytes=1 << 20))
    data[2] ^= 0xFF
    storage.write_bytes_atomic(f"{w}/c/1/0", bytes(data))
    assert storage.remove(f"{w}/c/3/1") is True
    assert main(["verify", path, "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    # Coverage first (missing, stray), then each chunk that failed its read.
    assert [(p["array"], p["file"]) for p in problems] == [
        ("w", f"{w}/c/3/1"), ("w", f"{w}/c/1/0")]
    assert "missing chunk file" in problems[0]["message"] and "crc32c" in problems[1]["message"]


def test_verify_on_s3_reports_stray_and_missing_chunk_objects(bucket):
    values = np.arange(32, dtype=np.float32).reshape(8, 4)
    path = dcheckpoint.save_pytree(
        f"{bucket}/coverage", {"w": _sharded(_mesh((4, 2)), P("x", "y"), values)})
    storage = open_storage(path)
    w = dcheckpoint.read_metadata(path).arrays["w"].storage_path  # data-<save id>/w
    chunk = storage.read_bytes(f"{w}/c/0/0", max_bytes=1 << 20)
    storage.write_bytes_atomic(f"{w}/c/4/0", chunk)  # grid is [4, 2]: row 4 is outside it
    assert storage.remove(f"{w}/c/2/1") is True
    steps = []
    report = dcheckpoint.verify(path, progress=steps.append)
    assert [(p.array, p.file, p.message) for p in report.problems] == [
        ("w", f"{w}/c/4/0", "unexpected file: not a chunk of the array's grid (grid [4, 2])"),
        ("w", f"{w}/c/2/1", "missing chunk file: expected every chunk of the grid [4, 2] to "
                         "be stored, found no file"),
    ]
    assert (report.arrays_checked, report.chunks_checked, sum(steps)) == (1, 7, 8)
    assert report.bytes_read == 7 * (2 * 2 * 4 + 4)  # stored size: data plus crc32c
    assert storage.list_files(f"{w}/c/3") == ["0", "1"]


def test_overwriting_a_prefix_leaves_one_data_directory_and_old_readers_get_a_clear_error(
        bucket):
    path = f"{bucket}/over/ckpt-5"
    dcheckpoint.save_pytree(path, {"w": np.full(4, 1, np.int32)})
    old = dcheckpoint.read_metadata(path)
    dcheckpoint.save_pytree(path, {"w": np.full(4, 2, np.int32)})
    # The new save's data is under a new name; the old one's is gone, not overwritten.
    (data_dir,) = [n for n in open_storage(path).list_dir() if n.startswith("data-")]
    assert dcheckpoint.read_metadata(path).arrays["w"].storage_path == f"{data_dir}/w"
    assert old.arrays["w"].storage_path != f"{data_dir}/w"
    with pytest.raises(CheckpointNotFoundError, match="replaced by another save while"):
        dcheckpoint._engine.restore_arrays(path, {"w": None}, metadata=old)
    np.testing.assert_array_equal(dcheckpoint.restore_pytree(path, {"w": None})["w"], [2] * 4)


def test_packed_small_arrays_on_s3_restore_verify_and_name_a_corrupt_array(bucket):
    # 100 small arrays (and a sharded one) are packed: one object per process and dtype.
    layers = {f"layer{i}": {f"b{j}": np.arange(10 * i + j + 1, dtype=np.float32) * (j + 1)
                            for j in range(10)} for i in range(10)}
    sharded = np.arange(64, dtype=np.int32).reshape(8, 8)
    tree = {**layers, "s": _sharded(_mesh((4, 2)), P("x", "y"), sharded)}
    path = dcheckpoint.save_pytree(f"{bucket}/packed", tree)
    meta = dcheckpoint.read_metadata(path)
    assert len(meta.arrays) == 101 and all(meta.packed.holds(p) for p in meta.arrays)
    storage = open_storage(path)
    packed = sorted(meta.packed.arrays)
    assert [n.rsplit("/", 1)[-1] for n in packed] == ["float32", "int32"]
    for name in packed:
        assert storage.list_files(f"{name}/c") == ["0"]

    target = NamedSharding(_mesh((2, 2)), P("y", "x"))
    restored = dcheckpoint.restore_pytree(
        path, {**{k: dict.fromkeys(v) for k, v in layers.items()}, "s": target})
    for layer, arrays in layers.items():
        for name, want in arrays.items():
            np.testing.assert_array_equal(restored[layer][name], want)
    assert restored["s"].sharding == target
    np.testing.assert_array_equal(np.asarray(restored["s"]), sharded)
    assert dcheckpoint.verify(path).ok

    float32 = next(n for n in packed if n.endswith("float32"))
    data = bytearray(storage.read_bytes(f"{float32}/c/0", max_bytes=1 << 20))
    assert len(data) == 4 * meta.packed.arrays[float32].size + 4  # no 1 MiB edge chunk
    data[0] ^= 0xFF  # the first element of the first member: layer0/b0
    storage.write_bytes_atomic(f"{float32}/c/0", bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"layer0/b0"):
        dcheckpoint.restore_pytree(path, {"layer0": {"b0": None}})
    assert not dcheckpoint.verify(path).ok
