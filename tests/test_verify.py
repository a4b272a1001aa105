"""verify(path): every chunk read, every checksum and every array's coverage checked."""

import os
import shutil

import jax
import numpy as np
import pytest

from dcheckpoint._engine import read_metadata, save_arrays
from dcheckpoint._storage import open_storage
from dcheckpoint._verify import VerifyReport, chunk_count, verify
from dcheckpoint.errors import CorruptCheckpointError
from tests.ckpt_files import array_dir

# 8 chunks of 2 rows (sharded over 8 devices), a scalar, an empty array, a nested path.
WEIGHTS = np.arange(64, dtype=np.float32).reshape(16, 4)


def _save(path) -> str:
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    weights = jax.make_array_from_callback(WEIGHTS.shape, sharding, lambda i: WEIGHTS[i])
    return save_arrays(str(path), {
        "model/weights": weights,
        "step": np.int32(7),
        "empty": np.zeros((0, 3), np.float32),
    })


@pytest.fixture
def checkpoint(tmp_path):
    return _save(tmp_path / "ckpt-1")


def _rel(checkpoint, rel):
    """``rel`` inside the save's data directory, relative to the checkpoint."""
    return f"{array_dir(checkpoint, 'step').parent.name}/{rel}"


def _at(checkpoint, rel):
    return os.path.join(checkpoint, _rel(checkpoint, rel))


def _flip(path, offset=0):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_a_sound_checkpoint_passes(checkpoint):
    report = verify(checkpoint)
    assert isinstance(report, VerifyReport)
    assert report.ok, report.problems
    assert report.arrays_checked == 3
    assert report.chunks_checked == 8 + 1  # 8 weight chunks and the scalar's one
    assert report.bytes_read == 8 * (2 * 4 * 4 + 4) + (4 + 4)  # data plus crc32c each
    report.raise_if_failed()  # no-op


def test_every_damaged_chunk_is_reported_not_just_the_first(checkpoint):
    _flip(_at(checkpoint, "model/weights/c/1/0"))
    _flip(_at(checkpoint, "model/weights/c/6/0"), offset=5)
    os.remove(_at(checkpoint, "step/c"))
    report = verify(checkpoint)
    assert not report.ok
    by_array = report.problems_by_array()
    assert sorted(by_array) == ["model/weights", "step"]
    weights = by_array["model/weights"]
    assert [m.split(":")[0] for m in weights] == [_rel(checkpoint, "model/weights/c/1/0"),
                                                  _rel(checkpoint, "model/weights/c/6/0")]
    assert all("crc32c" in m for m in weights)
    assert "missing chunk file" in by_array["step"][0]
    assert report.chunks_checked == 6
    with pytest.raises(CorruptCheckpointError, match="3 problem"):
        report.raise_if_failed()


def test_truncated_and_stray_chunk_files(checkpoint):
    chunk = _at(checkpoint, "model/weights/c/3/0")
    with open(chunk, "r+b") as f:
        f.truncate(10)
    os.makedirs(_at(checkpoint, "model/weights/c/9"))
    shutil.copy(_at(checkpoint, "model/weights/c/0/0"),
                _at(checkpoint, "model/weights/c/9/0"))
    problems = verify(checkpoint).problems_by_array()["model/weights"]
    assert problems == [
        f"{_rel(checkpoint, 'model/weights/c/9/0')}: unexpected file: not a chunk of the "
        "array's grid (grid [8, 1])",
        f"{_rel(checkpoint, 'model/weights/c/3/0')}: chunk file is 10 bytes, expected 36 "
        "(truncated or padded)",
    ]


def test_damaged_metadata_is_reported_not_raised(checkpoint):
    _flip(os.path.join(checkpoint, "dcheckpoint.json"), offset=200)
    report = verify(checkpoint)
    assert [(p.array, p.file) for p in report.problems] == [(None, "dcheckpoint.json")]
    assert "checksum mismatch" in report.problems[0].message or "JSON" in \
        report.problems[0].message
    assert verify(os.path.join(checkpoint, "nowhere")).problems[0].message.startswith(
        "No committed checkpoint")


def test_symlinks_and_zarr_json_damage(checkpoint, tmp_path):
    outside = _save(tmp_path / "other")
    shutil.rmtree(_at(checkpoint, "model/weights"))
    os.symlink(_at(outside, "model/weights"), _at(checkpoint, "model/weights"))
    with open(_at(checkpoint, "step/zarr.json"), "w") as f:
        f.write("{not json")
    report = verify(checkpoint)
    files = [(p.array, p.file) for p in report.problems]
    weights = _rel(checkpoint, "model/weights")
    assert (None, weights) in files  # the link itself
    assert ("model/weights", weights) in files  # refused as outside
    assert ("step", _rel(checkpoint, "step/zarr.json")) in files
    assert "outside the checkpoint directory" in report.problems_by_array()["model/weights"][0]


def test_progress_counts_every_chunk_once_read_or_not(checkpoint):
    os.remove(_at(checkpoint, "model/weights/c/2/0"))
    steps = []
    report = verify(checkpoint, progress=steps.append)
    assert chunk_count(read_metadata(checkpoint)) == 9
    assert sum(steps) == 9 and all(n > 0 for n in steps)
    assert report.chunks_checked == 8  # the missing chunk is counted done, not checked

    class Bar:  # tqdm-like: progress goes to its update method
        n = 0

        def update(self, n):
            self.n += n

    bar = Bar()
    verify(checkpoint, progress=bar)
    assert bar.n == 9


def test_list_files_is_recursive_and_relative(checkpoint):
    storage = open_storage(checkpoint)
    assert storage.list_files(_rel(checkpoint, "model/weights")) == [
        "c/0/0", "c/1/0", "c/2/0", "c/3/0", "c/4/0", "c/5/0", "c/6/0", "c/7/0", "zarr.json"]
    assert storage.list_files(_rel(checkpoint, "step")) == ["c", "zarr.json"]
    assert storage.list_files("nowhere") == []
