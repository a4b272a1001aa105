"""The directory's state file: format, atomic replacement, path safety, latest_checkpoint."""

import json
import os

import pytest

from dcheckpoint._metadata import METADATA_FILE
from dcheckpoint._state_file import (
    STATE_FILENAME,
    CheckpointState,
    delete_checkpoint,
    get_checkpoint_state,
    is_committed,
    latest_checkpoint,
    remove_leftover_temporaries,
    write_checkpoint_state,
)
from dcheckpoint.errors import CorruptCheckpointError


def make_committed(path):
    """A directory the engine would call committed: it holds the metadata file."""
    os.makedirs(os.path.join(path, "model"), exist_ok=True)
    with open(os.path.join(path, METADATA_FILE), "w") as f:
        f.write("{}")
    return str(path)


def test_round_trip_stores_relative_paths_and_reads_them_joined(tmp_path):
    state = CheckpointState(
        model_checkpoint_path=str(tmp_path / "ckpt-3"),
        all_model_checkpoint_paths=(str(tmp_path / "ckpt-2"), str(tmp_path / "ckpt-3")),
        all_model_checkpoint_timestamps=(100.5, 200.25),
        last_preserved_timestamp=50.0,
    )
    write_checkpoint_state(tmp_path, state)

    document = json.loads((tmp_path / STATE_FILENAME).read_text())
    assert document["model_checkpoint_path"] == "ckpt-3"
    assert document["all_model_checkpoint_paths"] == ["ckpt-2", "ckpt-3"]
    assert document["all_model_checkpoint_timestamps"] == [100.5, 200.25]
    assert document["last_preserved_timestamp"] == 50.0
    assert (tmp_path / STATE_FILENAME).read_text().count("\n") > 5  # pretty printed
    assert get_checkpoint_state(tmp_path) == state
    assert sorted(os.listdir(tmp_path)) == [STATE_FILENAME]  # no temporary left


def test_replacement_is_a_new_file_each_time(tmp_path):
    state = CheckpointState(str(tmp_path / "ckpt-1"), (str(tmp_path / "ckpt-1"),), (1.0,), 0.0)
    write_checkpoint_state(tmp_path, state)
    first = os.stat(tmp_path / STATE_FILENAME).st_ino
    write_checkpoint_state(tmp_path, state)
    assert os.stat(tmp_path / STATE_FILENAME).st_ino != first


def test_missing_state_file_means_no_state(tmp_path):
    assert get_checkpoint_state(tmp_path) is None
    assert get_checkpoint_state(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None


def _write_document(directory, **fields):
    document = {
        "format": "dcheckpoint.CheckpointState",
        "version": 1,
        "model_checkpoint_path": "ckpt-1",
        "all_model_checkpoint_paths": ["ckpt-1"],
        "all_model_checkpoint_timestamps": [1.0],
        "last_preserved_timestamp": 0.0,
    }
    document.update(fields)
    (directory / STATE_FILENAME).write_text(json.dumps(document))


@pytest.mark.parametrize("bad", ["../elsewhere", "/etc/passwd", "a/../../b", "./ckpt-1", ""])
def test_a_path_leaving_the_directory_is_refused_on_read(tmp_path, bad):
    _write_document(tmp_path, all_model_checkpoint_paths=["ckpt-1", bad],
                    all_model_checkpoint_timestamps=[1.0, 2.0])
    with pytest.raises(CorruptCheckpointError, match="not a plain path inside the directory"):
        get_checkpoint_state(tmp_path)
    _write_document(tmp_path, model_checkpoint_path=bad)
    with pytest.raises(CorruptCheckpointError, match="not a plain path inside the directory"):
        latest_checkpoint(tmp_path)


def test_a_path_outside_is_refused_on_write(tmp_path):
    state = CheckpointState(str(tmp_path.parent / "other" / "ckpt-1"))
    with pytest.raises(CorruptCheckpointError, match="not a plain path"):
        write_checkpoint_state(tmp_path, state)


def test_malformed_state_files_are_corrupt(tmp_path):
    (tmp_path / STATE_FILENAME).write_text("model_checkpoint_path: 'ckpt-1'")
    with pytest.raises(CorruptCheckpointError, match="is not a dcheckpoint.CheckpointState"):
        get_checkpoint_state(tmp_path)
    _write_document(tmp_path, version=7)
    with pytest.raises(CorruptCheckpointError, match="CheckpointState' version 7"):
        get_checkpoint_state(tmp_path)
    _write_document(tmp_path, all_model_checkpoint_timestamps=[1.0, 2.0])
    with pytest.raises(CorruptCheckpointError, match="1 checkpoint paths but 2 timestamps"):
        get_checkpoint_state(tmp_path)


@pytest.mark.parametrize("document", ["[]", '"ckpt-1"', "null", "7"])
def test_a_state_file_that_is_not_an_object_is_corrupt(tmp_path, document):
    (tmp_path / STATE_FILENAME).write_text(document)
    with pytest.raises(CorruptCheckpointError, match="expected a JSON object, found"):
        get_checkpoint_state(tmp_path)


def test_latest_checkpoint_only_when_committed(tmp_path):
    _write_document(tmp_path, model_checkpoint_path="ckpt-1")
    assert latest_checkpoint(tmp_path) is None  # named but not on disk
    os.makedirs(tmp_path / "ckpt-1")
    assert latest_checkpoint(tmp_path) is None  # on disk but never committed
    make_committed(tmp_path / "ckpt-1")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")


def test_delete_removes_the_marker_then_the_tree(tmp_path):
    path = make_committed(tmp_path / "ckpt-1")
    assert is_committed(path)
    assert delete_checkpoint(path) is True
    assert not os.path.exists(path)
    assert delete_checkpoint(path) is False


def test_leftover_temporaries_are_removed_and_nothing_else(tmp_path):
    make_committed(tmp_path / "ckpt-1")
    os.makedirs(tmp_path / "ckpt-2.tmp-abc123" / "x")
    (tmp_path / ".checkpoint.tmp-99").write_text("partial")
    (tmp_path / STATE_FILENAME).write_text("{}")
    removed = remove_leftover_temporaries(tmp_path)
    assert removed == [str(tmp_path / ".checkpoint.tmp-99"), str(tmp_path / "ckpt-2.tmp-abc123")]
    assert sorted(os.listdir(tmp_path)) == [STATE_FILENAME, "ckpt-1"]
