"""Corrupt and hostile checkpoints: each refused with an error naming the array or file,
what was expected and what was found; no crash, hang or huge allocation."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from dcheckpoint._engine import read_metadata, save_arrays
from dcheckpoint._metadata import _digest
from dcheckpoint._pytree import restore_pytree
from dcheckpoint.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from tests.ckpt_files import array_dir

WEIGHTS = np.arange(64, dtype=np.float32).reshape(16, 4)
BIAS = np.arange(5, dtype=np.int32)


def _target():
    return {"model": {"weights": np.zeros_like(WEIGHTS)}, "bias": np.zeros_like(BIAS)}


@pytest.fixture
def checkpoint(tmp_path):
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    weights = jax.make_array_from_callback(WEIGHTS.shape, sharding, lambda i: WEIGHTS[i])
    path = save_arrays(str(tmp_path / "ckpt-1"), {"model/weights": weights, "bias": BIAS})
    restored = restore_pytree(path, _target())  # sound before we damage it
    np.testing.assert_array_equal(restored["model"]["weights"], WEIGHTS)
    return path


def _edit_metadata(checkpoint, edit, *, resign=True):
    path = os.path.join(checkpoint, "dcheckpoint.json")
    doc = json.load(open(path))
    edit(doc)
    if resign:  # a hostile writer can compute the checksum too
        doc["sha256"] = _digest(doc["checkpoint"])
    json.dump(doc, open(path, "w"))


def _chunk(checkpoint, name="model/weights/c/3/0"):
    """The file of ``<array>/<chunk key>``, inside the save's data directory."""
    array, key = name.rsplit("/c/", 1)
    return os.path.join(array_dir(checkpoint, array), "c", key)


def test_flipped_byte_in_a_chunk(checkpoint):
    data = bytearray(open(_chunk(checkpoint), "rb").read())
    data[9] ^= 0x01
    open(_chunk(checkpoint), "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"Array 'model/weights'.*crc32c"):
        restore_pytree(checkpoint, _target())


@pytest.mark.parametrize("offset", [0, 40, 300, -3])
def test_flipped_byte_in_the_metadata_file(checkpoint, offset):
    path = os.path.join(checkpoint, "dcheckpoint.json")
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x04
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="dcheckpoint.json"):
        restore_pytree(checkpoint, _target())


def test_truncated_chunk(checkpoint):
    with open(_chunk(checkpoint), "r+b") as f:
        f.truncate(7)
    with pytest.raises(CorruptCheckpointError, match=r"Array 'model/weights'"):
        restore_pytree(checkpoint, _target())


def test_missing_chunk(checkpoint):
    os.remove(_chunk(checkpoint, "bias/c/0"))
    with pytest.raises(CorruptCheckpointError, match=r"Array 'bias'.*missing"):
        restore_pytree(checkpoint, _target())


def test_missing_metadata_file_is_not_a_checkpoint(checkpoint):
    os.remove(os.path.join(checkpoint, "dcheckpoint.json"))
    with pytest.raises(CheckpointNotFoundError, match="an interrupted save, or not a checkpoint"):
        restore_pytree(checkpoint, _target())


@pytest.mark.parametrize("storage_path", [
    "../ckpt-2/bias", "model/../../x", "/etc", "/tmp/x/bias", "a//b", ".", "./bias",
    ".hidden", "__zarr", "a\\..\\b", "",
])
def test_metadata_paths_escaping_the_checkpoint(checkpoint, storage_path):
    def edit(doc):
        doc["checkpoint"]["arrays"]["bias"]["storage_path"] = storage_path
    _edit_metadata(checkpoint, edit)
    with pytest.raises(CorruptCheckpointError, match=r"Array 'bias'.*storage path"):
        read_metadata(checkpoint)


def test_symlinked_array_directory_pointing_outside(checkpoint, tmp_path):
    outside = tmp_path / "outside"
    bias = array_dir(checkpoint, "bias")
    shutil.copytree(bias, outside)  # valid data, wrong place
    shutil.rmtree(bias)
    os.symlink(outside, bias)
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint directory"):
        restore_pytree(checkpoint, _target())


def test_symlinked_metadata_file_pointing_outside(checkpoint, tmp_path):
    real = tmp_path / "meta.json"
    shutil.move(os.path.join(checkpoint, "dcheckpoint.json"), real)
    os.symlink(real, os.path.join(checkpoint, "dcheckpoint.json"))
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint directory"):
        read_metadata(checkpoint)


@pytest.mark.parametrize("version, advice", [
    (0, "older dcheckpoint"), (1, "older dcheckpoint.*save it again"),
    (3, "newer dcheckpoint; upgrade"), (99, "newer dcheckpoint"),
    ("2", "malformed"), (None, "malformed"), (2.5, "malformed"), (True, "malformed"),
])
def test_unknown_format_versions(checkpoint, version, advice):
    _edit_metadata(checkpoint, lambda doc: doc.update(format_version=version))
    with pytest.raises(CorruptCheckpointError, match=rf"dcheckpoint.json: .*format version "
                       rf"{re.escape(repr(version))}, this dcheckpoint reads version 2") as e:
        read_metadata(checkpoint)
    assert re.search(advice, str(e.value)), str(e.value)


@pytest.mark.parametrize("field, value, found", [
    ("shape", [2**40, 2**40], "absurd shape"),
    ("shape", [2**61, 0, 2**20], "absurd shape"),  # zero-size, yet too big for numpy
    ("shape", [-1], "shape must be a list of integers >= 0, found \\[-1\\]"),
    ("shape", [5, 1], "same rank"),
    ("shape", [1] * 40, "at most 32"),
    ("shape", "5", "found '5'"),
    ("chunk_shape", [0], "chunk_shape must be a list of integers >= 1"),
    ("dtype", "object", "unsupported dtype 'object'"),
    ("dtype", "<U10", "unsupported dtype"),
    ("dtype", ["float32"], "unsupported dtype"),
    ("dtype", {"a": 1}, "unsupported dtype"),
])
def test_absurd_shapes_and_dtypes(checkpoint, field, value, found):
    def edit(doc):
        doc["checkpoint"]["arrays"]["bias"][field] = value
        if value in ([2**40, 2**40], [2**61, 0, 2**20]):
            doc["checkpoint"]["arrays"]["bias"]["chunk_shape"] = [1] * len(value)
    _edit_metadata(checkpoint, edit)
    with pytest.raises(CorruptCheckpointError, match=rf"Array 'bias'.*{found}"):
        read_metadata(checkpoint)


def test_metadata_and_zarr_json_disagree(checkpoint):
    # A big shape in our metadata only: the array's zarr.json says otherwise, so the
    # restore is refused when the array is opened, before anything is allocated.
    def edit(doc):
        doc["checkpoint"]["arrays"]["bias"]["shape"] = [2**33]
        doc["checkpoint"]["arrays"]["bias"]["chunk_shape"] = [2**33]
    _edit_metadata(checkpoint, edit)
    target = {"bias": None}
    with pytest.raises(CorruptCheckpointError, match=r"Array 'bias'.*(does not match|memory)"):
        restore_pytree(checkpoint, target)


def test_oversized_metadata_file_is_not_read_whole(checkpoint, monkeypatch):
    from dcheckpoint import _engine
    monkeypatch.setattr(_engine, "MAX_METADATA_BYTES", 100)
    with pytest.raises(CorruptCheckpointError, match="larger than the 100-byte limit"):
        read_metadata(checkpoint)


def test_shape_dtype_and_structure_mismatch_against_the_target(checkpoint):
    wrong_shape = _target()
    wrong_shape["model"]["weights"] = np.zeros((4, 16), np.float32)
    with pytest.raises(CheckpointMismatchError,
                       match=r"'model/weights'.*shape \(4, 16\).*shape \(16, 4\)"):
        restore_pytree(checkpoint, wrong_shape)
    wrong_dtype = _target()
    wrong_dtype["bias"] = np.zeros(5, np.float64)
    with pytest.raises(CheckpointMismatchError, match=r"'bias'.*dtype float64.*int32"):
        restore_pytree(checkpoint, wrong_dtype)
    extra = {**_target(), "optimizer": {"mu": np.zeros(3, np.float32)}}
    with pytest.raises(CheckpointMismatchError, match=r"no arrays \['optimizer/mu'\]"):
        restore_pytree(checkpoint, extra)
    assert isinstance(CheckpointMismatchError("x"), ValueError)
