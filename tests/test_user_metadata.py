"""Per-save metadata: a small JSON dict stored in the checkpoint's metadata file."""

import json
import os

import numpy as np
import pytest

from dcheckpoint import Checkpoint, CheckpointManager, CheckpointOptions, Variable, read_metadata
from dcheckpoint._metadata import METADATA_FILE, _digest
from dcheckpoint._user_metadata import MAX_USER_METADATA_BYTES
from dcheckpoint.errors import CorruptCheckpointError


def make():
    return Checkpoint(weights=Variable(np.arange(4, dtype=np.float32)))


def test_checkpoint_save_and_write_store_the_dict(tmp_path):
    checkpoint = make()
    meta = {"loss": 0.25, "metrics": {"acc": [0.5, 0.75]}, "config_sha": "ab12", "ok": True,
            "note": None, "epoch": np.int64(3), "lr": np.float32(0.5)}
    path = checkpoint.save(tmp_path / "ckpt", metadata=meta)
    stored = read_metadata(path).user_metadata
    assert stored == {"loss": 0.25, "metrics": {"acc": [0.5, 0.75]}, "config_sha": "ab12",
                      "ok": True, "note": None, "epoch": 3, "lr": 0.5}
    assert type(stored["epoch"]) is int  # numpy scalars became JSON numbers
    written = checkpoint.write(str(tmp_path / "plain"), metadata={"k": "v"})
    assert read_metadata(written).user_metadata == {"k": "v"}
    # Without metadata the field is absent, and old readers see the same file as before.
    bare = checkpoint.write(str(tmp_path / "bare"))
    assert read_metadata(bare).user_metadata is None
    body = json.loads((tmp_path / "bare" / METADATA_FILE).read_text())["checkpoint"]
    assert "user_metadata" not in body


def test_manager_adds_the_step_and_async_saves_carry_it(tmp_path):
    manager = CheckpointManager(make(), tmp_path, max_to_keep=2)
    path = manager.save(checkpoint_number=70, metadata={"loss": 1.5},
                        options=CheckpointOptions(enable_async=True))
    manager.sync()
    assert read_metadata(path).user_metadata == {"step": 70, "loss": 1.5}
    path = manager.save()  # no metadata: still the step (save_counter counted the first)
    assert read_metadata(path).user_metadata == {"step": 2}
    path = manager.save(metadata={"step": 12})  # the caller's own step wins
    assert read_metadata(path).user_metadata == {"step": 12}


@pytest.mark.parametrize("metadata, message", [
    ({"loss": float("nan")}, r"metadata\['loss'\]: nan is not a finite number"),
    ({"a": {"b": [1, {2, 3}]}}, r"metadata\['a'\]\['b'\]\[1\]: a set is not a JSON value"),
    ({"a": {3: 1}}, r"metadata\['a'\]: key 3 is a int; JSON object keys must be str"),
    ({"arr": np.zeros(3)}, r"metadata\['arr'\]: a ndarray is not a JSON value"),
    ({"blob": "x" * MAX_USER_METADATA_BYTES},
     r"more than the 65536 allowed \(largest entry: 'blob'\)"),
    ([("a", 1)], r"must be a dict of JSON values, got list"),
])
def test_bad_metadata_is_refused_before_anything_changes(tmp_path, metadata, message):
    checkpoint = make()
    manager = CheckpointManager(checkpoint, tmp_path / "run", max_to_keep=2)
    manager.save()
    with pytest.raises(ValueError, match=message):
        manager.save(metadata=metadata, options=CheckpointOptions(enable_async=True))
    with pytest.raises(ValueError, match=message):
        checkpoint.save(tmp_path / "direct", metadata=metadata)
    manager.sync()
    # Nothing written, nothing counted, nothing deleted.
    assert int(checkpoint.save_counter.value) == 1
    assert manager.checkpoints == [str(tmp_path / "run" / "ckpt-1")]
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_tampered_user_metadata_field_is_corruption(tmp_path):
    path = make().save(tmp_path / "ckpt", metadata={"loss": 1.0})
    file = tmp_path / "ckpt-1" / METADATA_FILE
    doc = json.loads(file.read_text())
    doc["checkpoint"]["user_metadata"] = {"loss": 0.0}  # a better loss, by hand
    file.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="metadata checksum mismatch"):
        read_metadata(path)


def test_a_user_metadata_field_that_is_not_an_object_is_corruption(tmp_path):
    path = make().save(tmp_path / "ckpt", metadata={"loss": 1.0})
    file = tmp_path / "ckpt-1" / METADATA_FILE
    doc = json.loads(file.read_text())
    doc["checkpoint"]["user_metadata"] = [1, 2]
    doc["sha256"] = _digest(doc["checkpoint"])  # crafted: a valid checksum
    file.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="'user_metadata' must be an object"):
        read_metadata(path)
