"""The command line names the same checkpoints however the path is spelled, and stops
quietly when its reader goes away (`| head`)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import dcheckpoint
from dcheckpoint._cli import main
from tests.mp_util import REPO_ROOT


@pytest.fixture
def run_dir(tmp_path):
    """``tmp_path/runs/x`` holding ckpt-2..ckpt-4 of a manager with max_to_keep=3."""
    checkpoint = dcheckpoint.Checkpoint(w=dcheckpoint.Variable(jax.numpy.arange(4.0)))
    manager = dcheckpoint.CheckpointManager(checkpoint, tmp_path / "runs" / "x", max_to_keep=3)
    for _ in range(4):
        manager.save()
    return tmp_path / "runs" / "x"


def _ls(capsys, where):
    assert main(["ls", where, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("spelling", ["relative", "dot", "dot-slash", "absolute"])
def test_ls_marks_the_same_checkpoints_for_every_spelling(run_dir, capsys, monkeypatch,
                                                         spelling):
    cwd, where = {"relative": (run_dir.parent.parent, "runs/x"),
                  "dot": (run_dir, "."),
                  "dot-slash": (run_dir.parent, "./x/"),
                  "absolute": (run_dir.parent.parent, str(run_dir))}[spelling]
    monkeypatch.chdir(cwd)
    listing = _ls(capsys, where)
    assert [(c["number"], c["latest"], c["kept"]) for c in listing["checkpoints"]] == [
        (2, False, False), (3, False, False), (4, True, False)]
    monkeypatch.chdir(run_dir)
    assert main(["ls", "."]) == 0
    text = capsys.readouterr().out
    assert "k kept" not in text and "* latest" in text


def test_inspect_verify_and_rm_take_relative_paths(run_dir, capsys, monkeypatch):
    monkeypatch.chdir(run_dir.parent)
    assert main(["inspect", "x/ckpt-4", "--json"]) == 0
    arrays = {a["path"]: a for a in json.loads(capsys.readouterr().out)["arrays"]}
    assert arrays["w"]["shape"] == [4]
    assert main(["verify", "x/ckpt-4"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(run_dir)
    assert main(["rm", "ckpt-4"]) == 0  # the latest: the state file moves to ckpt-3
    capsys.readouterr()
    assert dcheckpoint.latest_checkpoint(str(run_dir)) == str(run_dir / "ckpt-3")
    assert [c["number"] for c in _ls(capsys, ".")["checkpoints"]] == [2, 3]
    assert not any(c["kept"] for c in _ls(capsys, ".")["checkpoints"])


def test_output_into_a_closed_pipe_ends_quietly(run_dir):
    # `dcheckpoint inspect ... | head -1`: the reader leaves after one line.
    many = dcheckpoint.save_pytree(str(run_dir.parent / "many"),
                                   {f"a{i:04d}": np.zeros(2) for i in range(3000)})
    command = (f"{sys.executable} -m dcheckpoint._cli inspect {many} | head -1; "
               "echo status=${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          timeout=120)
    assert "status=141" in done.stdout, done
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.count("\n") == 2  # the one line head printed, and the status
