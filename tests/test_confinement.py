"""Confinement: nothing a manager or reader does leaves its directory, follows a link out
of it, blocks on a file that is not a regular one, or mistakes a deleted checkpoint for
a corrupt one."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dcheckpoint import _engine, _manager
from dcheckpoint._engine import read_metadata, restore_arrays, save_arrays
from dcheckpoint._manager import CheckpointManager
from dcheckpoint._state_file import (
    STATE_FILENAME,
    CheckpointState,
    delete_checkpoint,
    get_checkpoint_state,
    latest_checkpoint,
    write_checkpoint_state,
)
from dcheckpoint._verify import verify
from dcheckpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from tests.ckpt_files import array_dir
from tests.mp_util import REPO_ROOT
from tests.test_manager import make_checkpoint, on_disk

BIAS = np.arange(5, dtype=np.int32)


def _other_project(tmp_path):
    """A committed checkpoint outside the managed directory, and its bytes."""
    path = save_arrays(str(tmp_path / "other" / "ckpt-1"), {"bias": BIAS})
    return path, _snapshot(path)


def _snapshot(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "", ".", "..", ".hidden",
                                  "x.tmp-1", "a\\b", "nul\0", 7])
def test_checkpoint_name_must_be_one_plain_component(tmp_path, name):
    managed = tmp_path / "managed"
    with pytest.raises(ValueError, match="checkpoint_name must be one plain path component"):
        CheckpointManager(make_checkpoint(), managed, max_to_keep=1, checkpoint_name=name)
    assert sorted(os.listdir(tmp_path)) == []  # nothing created, inside or out


def test_retention_unlinks_a_symlinked_entry_and_never_touches_its_target(tmp_path):
    outside, before = _other_project(tmp_path)
    managed = tmp_path / "managed"
    manager = CheckpointManager(make_checkpoint(), managed, max_to_keep=1)
    manager.save()
    # ckpt-1 (still in the managed list) is replaced by a link to another project.
    delete_checkpoint(managed / "ckpt-1")
    os.symlink(outside, managed / "ckpt-1")
    manager.save()  # retention deletes ckpt-1
    assert on_disk(managed) == ["ckpt-2"]  # the link itself is gone
    assert _snapshot(outside) == before  # its target, commit marker included, is intact
    assert verify(outside).ok


def test_a_symlinked_state_entry_is_neither_restored_nor_deleted(tmp_path):
    outside, before = _other_project(tmp_path)
    managed = tmp_path / "managed"
    managed.mkdir()
    os.symlink(outside, managed / "ckpt-1")
    write_checkpoint_state(managed, CheckpointState(
        str(managed / "ckpt-1"), (str(managed / "ckpt-1"),), (1.0,), 0.0))
    with pytest.raises(CorruptCheckpointError, match="symbolic link .*outside the managed"):
        latest_checkpoint(managed)
    manager = CheckpointManager(make_checkpoint(), managed, max_to_keep=1)
    assert manager.latest_checkpoint is None and manager.checkpoints == []
    manager.save()
    manager.save()
    assert _snapshot(outside) == before
    assert latest_checkpoint(managed) == str(managed / "ckpt-2")


def test_delete_checkpoint_on_a_link_removes_only_the_link(tmp_path):
    outside, before = _other_project(tmp_path)
    link = tmp_path / "link"
    os.symlink(outside, link)
    assert delete_checkpoint(link) is True
    assert not os.path.lexists(link)
    assert _snapshot(outside) == before


@pytest.mark.parametrize("entry", ["../other/ckpt-1", "sub/ckpt-1", ".", "..", "", "/abs"])
def test_state_file_entries_must_be_one_name(tmp_path, entry):
    document = {"format": "dcheckpoint.CheckpointState", "version": 1,
                "model_checkpoint_path": entry, "all_model_checkpoint_paths": [entry],
                "all_model_checkpoint_timestamps": [1.0], "last_preserved_timestamp": 0.0}
    (tmp_path / STATE_FILENAME).write_text(json.dumps(document))
    with pytest.raises(CorruptCheckpointError, match="not a plain path inside the directory"):
        get_checkpoint_state(tmp_path)


def test_a_state_file_that_is_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / STATE_FILENAME).mkdir()
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint: expected a regular file, "
                                                     r"found a directory"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="found a directory"):
        CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=1)


# Each case in one fresh process (a FIFO opened for reading blocks the opener forever):
# a hang is a timeout, and the test fails instead of hanging the suite.
NO_HANG = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from dcheckpoint import latest_checkpoint, read_metadata, restore_pytree, verify
    from dcheckpoint._cli import main
    from dcheckpoint._engine import save_arrays
    root, case = sys.argv[1], sys.argv[2]
    ckpt = save_arrays(os.path.join(root, "ckpt-1"), {"bias": np.arange(5, dtype=np.int32)})
    array = os.path.join(ckpt, read_metadata(ckpt).arrays["bias"].storage_path)
    special = {"state": os.path.join(root, "checkpoint"),
               "metadata": os.path.join(ckpt, "dcheckpoint.json"),
               "chunk": os.path.join(array, "c", "0"),
               "zarr.json": os.path.join(array, "zarr.json")}[case]
    if os.path.exists(special):
        os.remove(special)
    os.mkfifo(special)
    outcome = {}
    def attempt(what, call):
        try:
            outcome[what] = ["returned", repr(call())]
        except Exception as e:
            outcome[what] = [type(e).__name__, str(e)]
    attempt("latest_checkpoint", lambda: latest_checkpoint(root))
    attempt("read_metadata", lambda: read_metadata(ckpt))
    attempt("restore", lambda: restore_pytree(ckpt, {"bias": None}))
    attempt("verify", lambda: [p.message for p in verify(ckpt).problems])
    attempt("ls", lambda: main(["ls", "--json", root]))
    print("OUTCOME", json.dumps(outcome), flush=True)
""")


def _no_hang(tmp_path, case):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run([sys.executable, "-c", NO_HANG, str(tmp_path), case], env=env,
                               capture_output=True, text=True, timeout=60)
    line = next(x for x in completed.stdout.splitlines() if x.startswith("OUTCOME"))
    return json.loads(line.split(" ", 1)[1])


def test_a_fifo_named_checkpoint_is_refused_without_blocking(tmp_path):
    outcome = _no_hang(tmp_path, "state")
    assert outcome["latest_checkpoint"][0] == "CorruptCheckpointError"
    assert "checkpoint: expected a regular file, found a FIFO" in outcome["latest_checkpoint"][1]
    assert outcome["restore"][0] == "returned"  # the checkpoint itself is sound
    assert outcome["ls"] == ["returned", "2"]  # a clear error, exit status 2


def test_a_fifo_named_dcheckpoint_json_is_refused_without_blocking(tmp_path):
    outcome = _no_hang(tmp_path, "metadata")
    for call in ("read_metadata", "restore"):
        assert outcome[call][0] == "CorruptCheckpointError"
        assert "dcheckpoint.json: expected a regular file, found a FIFO" in outcome[call][1]
    assert outcome["verify"][0] == "returned" and "found a FIFO" in outcome["verify"][1]
    assert outcome["ls"] == ["returned", "2"]


@pytest.mark.parametrize("case", ["chunk", "zarr.json"])
def test_a_fifo_among_an_arrays_files_is_refused_without_blocking(tmp_path, case):
    outcome = _no_hang(tmp_path, case)
    assert outcome["restore"][0] == "CorruptCheckpointError"
    assert "expected a regular file or directory, found a FIFO" in outcome["restore"][1]
    assert outcome["verify"][0] == "returned" and "found a FIFO" in outcome["verify"][1]
    assert outcome["read_metadata"][0] == "returned"


def test_a_checkpoint_deleted_under_a_reader_is_not_found_not_corrupt(tmp_path):
    path = save_arrays(str(tmp_path / "ckpt-1"), {"bias": BIAS})
    metadata = read_metadata(path)  # the reader has the metadata ...
    delete_checkpoint(path)  # ... then retention deletes the checkpoint
    with pytest.raises(CheckpointNotFoundError, match="deleted while it was being read"):
        restore_arrays(path, {"bias": None}, metadata=metadata)


def test_files_vanishing_mid_read_with_the_metadata_gone_are_not_found(tmp_path, monkeypatch):
    path = save_arrays(str(tmp_path / "ckpt-1"), {"bias": BIAS})
    real_check = _engine.check_restore

    def check_then_retention_deletes(*args):
        real_check(*args)
        delete_checkpoint(path)  # after the checks, before TensorStore reads a chunk

    monkeypatch.setattr(_engine, "check_restore", check_then_retention_deletes)
    with pytest.raises(CheckpointNotFoundError, match="deleted while it was being read"):
        restore_arrays(path, {"bias": None})


def test_a_restore_of_a_damaged_but_present_checkpoint_stays_corrupt(tmp_path):
    path = save_arrays(str(tmp_path / "ckpt-1"), {"bias": BIAS})
    os.remove(array_dir(path, "bias") / "c" / "0")
    with pytest.raises(CorruptCheckpointError, match="Array 'bias'.*missing chunk files"):
        restore_arrays(path, {"bias": None})


def test_the_state_file_never_names_a_checkpoint_being_deleted(tmp_path, monkeypatch):
    seen = []
    real_delete = _manager.delete_checkpoint

    def delete_as_a_reader_watches(path, *args, **kwargs):
        # A reader polling the state file at the moment of deletion.
        state = get_checkpoint_state(tmp_path)
        seen.append((os.path.basename(path), state.model_checkpoint_path,
                     [os.path.basename(p) for p in state.all_model_checkpoint_paths]))
        return real_delete(path, *args, **kwargs)

    monkeypatch.setattr(_manager, "delete_checkpoint", delete_as_a_reader_watches)
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=2)
    for _ in range(4):
        manager.save()
    assert seen == [("ckpt-1", str(tmp_path / "ckpt-3"), ["ckpt-2", "ckpt-3"]),
                    ("ckpt-2", str(tmp_path / "ckpt-4"), ["ckpt-3", "ckpt-4"])]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_savedmodel_name_must_be_one_plain_component(tmp_path, name):
    from dcheckpoint import ExportingCheckpointManager

    with pytest.raises(ValueError, match="savedmodel_name must be one plain path component"):
        ExportingCheckpointManager(make_checkpoint(), tmp_path / "managed", 1,
                                   serving_fn=None, params_fn=None, input_specs=(),
                                   savedmodel_name=name)
    assert os.listdir(tmp_path) == []


def test_victims_of_a_manager_killed_before_deleting_are_deleted_by_the_next(
        tmp_path, monkeypatch):
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=1)
    manager.save()
    # Killed right after the state write, before its deletion: nothing is deleted.
    monkeypatch.setattr(_manager, "delete_checkpoint", lambda path, *a, **k: False)
    manager.save()
    monkeypatch.undo()
    assert on_disk(tmp_path) == ["ckpt-1", "ckpt-2"]
    state = get_checkpoint_state(tmp_path)
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / "ckpt-2")]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-2")
    del manager
    restarted = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=1)
    assert on_disk(tmp_path) == ["ckpt-2"]
    assert restarted.checkpoints == [str(tmp_path / "ckpt-2")]


def test_a_pending_deletion_that_is_managed_again_is_kept(tmp_path):
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=1)
    manager.save()
    write_checkpoint_state(tmp_path, get_checkpoint_state(tmp_path),
                           pending_deletion=[str(tmp_path / "ckpt-1")])
    del manager
    CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=1)
    assert on_disk(tmp_path) == ["ckpt-1"]


def test_ls_skips_an_entry_that_links_out_of_the_directory(tmp_path, capsys):
    from dcheckpoint._cli import main

    outside, _ = _other_project(tmp_path)
    managed = tmp_path / "managed"
    save_arrays(str(managed / "ckpt-2"), {"bias": BIAS})
    os.symlink(outside, managed / "ckpt-1")
    assert main(["ls", "--json", str(managed)]) == 0
    captured = capsys.readouterr()
    listed = json.loads(captured.out)
    assert [row["name"] for row in listed["checkpoints"]] == ["ckpt-2"]
    assert "skipping" in captured.err and "outside the managed directory" in captured.err


@pytest.mark.parametrize("marker", ["../dcheckpoint.json", "a/b", "..", ""])
def test_a_commit_marker_must_be_one_file_name(tmp_path, marker):
    path = save_arrays(str(tmp_path / "ckpt-1"), {"bias": BIAS})
    with pytest.raises(ValueError, match="must be one file name"):
        delete_checkpoint(path, marker=marker)
    assert verify(path).ok
