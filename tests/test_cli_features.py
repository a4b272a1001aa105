"""The console command's newer parts: --version, metadata and kept marks in ls, artifacts,
metadata in inspect, and rm."""

import gc
import json
import os
import re
import shutil

import numpy as np
import pytest

import dcheckpoint
from dcheckpoint import _manager
from dcheckpoint._cli import main
from dcheckpoint._lock import LOCK_FILENAME
from dcheckpoint._metadata import METADATA_FILE
from dcheckpoint._state_file import STATE_FILENAME, get_checkpoint_state


def run_json(capsys, *argv):
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


@pytest.fixture
def run(tmp_path, monkeypatch):
    """ckpt-1..5 saved an hour apart, max_to_keep=2, one kept every 2 hours: the managed
    ones are 4 and 5, and 2 is kept for good; each with metadata. The manager is gone."""
    clock = iter(float(t) for t in range(10**6, 10**7, 3600))
    monkeypatch.setattr(_manager, "_now", lambda: next(clock))
    directory = tmp_path / "run"
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.arange(4, dtype=np.float32))),
        directory, max_to_keep=2, keep_checkpoint_every_n_hours=2)
    for step in range(1, 6):
        manager.save(metadata={"loss": 1.0 / step, "config_sha": "c0ffee"})
    del manager
    gc.collect()
    return directory


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("dcheckpoint ") and len(out.split()) >= 2


def test_ls_shows_metadata_and_marks_kept_checkpoints(run, capsys):
    status, out = run_json(capsys, "ls", str(run))
    assert status == 0
    rows = {r["name"]: r for r in out["checkpoints"]}
    assert sorted(rows) == ["ckpt-2", "ckpt-4", "ckpt-5"]
    assert {n: r["kept"] for n, r in rows.items()} == {
        "ckpt-2": True, "ckpt-4": False, "ckpt-5": False}
    assert rows["ckpt-4"]["metadata"] == {"loss": 0.25, "config_sha": "c0ffee", "step": 4}
    assert out["artifacts"] == []
    assert main(["ls", str(run)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1].startswith("k  2") and '"loss":0.5' in text[1]
    assert text[3].startswith("*  5") and '{"config_sha":"c0ffee","loss":0.2,"step":5}' in text[3]
    assert "k kept outside the managed list (keep_checkpoint_every_n_hours)" in text


def test_ls_and_inspect_show_metadata_without_reading_arrays(run, capsys):
    # Remove every array's data: only the metadata file is left to read.
    for name in os.listdir(run / "ckpt-5"):
        if name != METADATA_FILE:
            path = run / "ckpt-5" / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    status, out = run_json(capsys, "inspect", str(run / "ckpt-5"))
    assert status == 0
    assert out["user_metadata"] == {"loss": 0.2, "config_sha": "c0ffee", "step": 5}
    assert main(["inspect", str(run / "ckpt-5")]) == 0
    assert 'metadata: {"config_sha": "c0ffee", "loss": 0.2, "step": 5}' in (
        capsys.readouterr().out)
    status, out = run_json(capsys, "ls", str(run))
    assert out["checkpoints"][-1]["metadata"]["step"] == 5


def test_ls_lists_exported_artifacts(tmp_path, capsys):
    import jax

    manager = dcheckpoint.ExportingCheckpointManager(
        dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.ones(2, np.float32))), tmp_path,
        max_to_keep=2, serving_fn=lambda p, x: p["w"] * x,
        params_fn=lambda: {"w": np.ones(2, np.float32)},
        input_specs=[jax.ShapeDtypeStruct((2,), np.float32)])
    for _ in range(3):
        manager.save()
    del manager
    gc.collect()
    status, out = run_json(capsys, "ls", str(tmp_path))
    assert [a["name"] for a in out["artifacts"]] == ["savedmodel-2", "savedmodel-3"]
    assert [a["number"] for a in out["artifacts"]] == [2, 3]
    assert [r["name"] for r in out["checkpoints"]] == ["ckpt-2", "ckpt-3"]
    main(["ls", str(tmp_path)])
    assert "exported artifacts: savedmodel-2, savedmodel-3" in capsys.readouterr().out
    # An artifact's parameters are a checkpoint too, but not one to rm on its own.
    assert main(["rm", str(tmp_path / "savedmodel-3" / "params")]) == 2
    assert "holds the parameters of the exported artifact" in capsys.readouterr().err
    assert (tmp_path / "savedmodel-3" / "params" / METADATA_FILE).exists()


def test_rm_deletes_and_updates_the_state_file(run, capsys):
    status, out = run_json(capsys, "rm", str(run / "ckpt-5"))
    assert status == 0 and out == {"deleted": str(run / "ckpt-5"), "state_file_updated": True}
    assert not (run / "ckpt-5").exists()
    state = get_checkpoint_state(run)
    assert state.model_checkpoint_path == str(run / "ckpt-4")  # the latest moved back
    assert list(state.all_model_checkpoint_paths) == [str(run / "ckpt-4")]
    # A kept-for-good checkpoint is not in the state file: only the directory goes.
    status, out = run_json(capsys, "rm", str(run / "ckpt-2"))
    assert out["state_file_updated"] is False and not (run / "ckpt-2").exists()
    # A new manager continues from what is left.
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.zeros(4, np.float32))), run,
        max_to_keep=2)
    assert manager.all_steps() == [4] and manager.latest_step() == 4
    # The lock was released by rm: the manager took it.
    assert (run / LOCK_FILENAME).exists()


def test_rm_of_the_last_managed_checkpoint_removes_the_state_file(tmp_path, capsys):
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.zeros(1))), tmp_path, max_to_keep=1)
    manager.save()
    del manager
    gc.collect()
    assert main(["rm", str(tmp_path / "ckpt-1")]) == 0
    assert sorted(os.listdir(tmp_path)) == []
    assert dcheckpoint.latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("target, message", [
    ("run", r"is a directory of 3 checkpoint\(s\), not a checkpoint; try .*ckpt-5"),
    ("run/ckpt-9", r"no such checkpoint"),
    ("run/ckpt-7", r"is not a committed checkpoint: it has no dcheckpoint.json"),
])
def test_rm_refuses_what_is_not_a_checkpoint(run, capsys, target, message):
    os.makedirs(run / "ckpt-7")  # an interrupted save
    before = sorted(os.listdir(run))
    state = (run / STATE_FILENAME).read_bytes()
    assert main(["rm", str(run.parent / target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcheckpoint rm: ")
    assert re.search(message, err), err
    assert sorted(os.listdir(run)) == before
    assert (run / STATE_FILENAME).read_bytes() == state


def test_rm_refuses_a_directory_a_live_manager_writes(run, capsys):
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.zeros(4, np.float32))), run,
        max_to_keep=2)
    assert main(["rm", str(run / "ckpt-4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcheckpoint rm: ") and "CheckpointManager.delete(step)" in err
    assert (run / "ckpt-4" / METADATA_FILE).exists()
    del manager


def test_rm_refuses_a_symbolic_link_and_keeps_its_target(run, tmp_path, capsys):
    link = tmp_path / "link"
    os.symlink(run / "ckpt-4", link)
    assert main(["rm", str(link)]) == 2
    assert "is a symbolic link to" in capsys.readouterr().err
    assert (run / "ckpt-4" / METADATA_FILE).exists()
