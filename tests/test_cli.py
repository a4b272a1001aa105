"""The ``dcheckpoint`` console command on local directories: ls, inspect, verify."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint._cli import main
from dcheckpoint._metadata import METADATA_FILE
from tests.ckpt_files import array_dir
from tests.mp_util import REPO_ROOT


@pytest.fixture
def managed(tmp_path):
    """A managed directory with ckpt-2..ckpt-4 (max_to_keep=3) of a small model."""
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    kernel = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8),
                            NamedSharding(mesh, P("x", "y")))
    checkpoint = dcheckpoint.Checkpoint(model={
        "dense": {"kernel": dcheckpoint.Variable(kernel),
                  "bias": dcheckpoint.Variable(np.zeros(8, np.float32))}})
    manager = dcheckpoint.CheckpointManager(checkpoint, tmp_path / "run", max_to_keep=3)
    for _ in range(4):
        manager.save()
    return tmp_path / "run"


def run_json(capsys, *argv):
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_ls_lists_committed_checkpoints_and_marks_the_latest(managed, capsys):
    os.makedirs(managed / "ckpt-9")  # a save that never committed: not listed
    status, out = run_json(capsys, "ls", str(managed))
    assert status == 0
    assert out["latest"] == str(managed / "ckpt-4")
    rows = out["checkpoints"]
    assert [(r["name"], r["number"], r["latest"]) for r in rows] == [
        ("ckpt-2", 2, False), ("ckpt-3", 3, False), ("ckpt-4", 4, True)]
    # kernel 8x8 float32 (256) + bias 8 float32 (32) + save_counter int32 (4).
    assert {(r["arrays"], r["bytes"]) for r in rows} == {(3, 292)}
    assert rows[0]["save_time"] <= rows[1]["save_time"] <= rows[2]["save_time"]


def test_ls_text_output_is_a_table(managed, capsys):
    assert main(["ls", str(managed)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NUMBER", "SAVED", "(UTC)", "SIZE", "ARRAYS", "NAME", "METADATA"]
    assert lines[-2].split()[0] == "*" and lines[-2].endswith('ckpt-4  {"step":4}')
    assert "292 B" in lines[1]


def test_ls_of_an_empty_directory_says_so(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 0
    assert "no committed checkpoints" in capsys.readouterr().out


def test_inspect_shows_each_array(managed, capsys):
    status, out = run_json(capsys, "inspect", str(managed / "ckpt-3"))
    assert status == 0
    arrays = {a["path"]: a for a in out["arrays"]}
    assert sorted(arrays) == ["model/dense/bias", "model/dense/kernel", "save_counter"]
    kernel = arrays["model/dense/kernel"]
    assert (kernel["shape"], kernel["dtype"], kernel["bytes"]) == ([8, 8], "float32", 256)
    assert kernel["chunk_shape"] == [2, 4]
    assert kernel["layout"]["sharding_specs"] == ["x", "y"]
    assert kernel["layout_text"] == "[x, y] on mesh x=4 y=2"
    assert arrays["save_counter"]["shape"] == [] and out["bytes"] == 292


def test_inspect_text_output_is_a_tree(managed, capsys):
    assert main(["inspect", str(managed / "ckpt-3")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3 arrays, 292 B" in lines[0]
    assert [line.split()[0] for line in lines[2:-1]] == [
        "model/", "dense/", "bias", "kernel", "save_counter"]
    assert lines[-1] == 'metadata: {"step": 3}'  # the manager records the step
    assert lines[5].split()[1:4] == ["8x8", "float32", "[x,"]


def test_verify_passes_a_sound_checkpoint(managed, capsys):
    status, out = run_json(capsys, "verify", str(managed / "ckpt-4"))
    assert (status, out["ok"], out["problems"]) == (0, True, [])
    assert (out["arrays_checked"], out["chunks_checked"]) == (3, 10)  # 8 + 1 + 1


def test_verify_exit_status_says_a_flipped_byte_was_found(managed):
    kernel = array_dir(managed / "ckpt-4", "model/dense/kernel")
    chunk = kernel / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    completed = subprocess.run(
        [sys.executable, "-m", "dcheckpoint._cli", "verify", str(managed / "ckpt-4"),
         "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1, completed.stderr
    out = json.loads(completed.stdout)
    assert out["ok"] is False
    assert [(p["array"], p["file"]) for p in out["problems"]] == [
        ("model/dense/kernel", f"{kernel.relative_to(managed / 'ckpt-4')}/c/1/0")]
    assert "crc32c" in out["problems"][0]["message"]


@pytest.mark.parametrize(
    ("command", "where", "message"),
    [
        ("inspect", "absent", "no such checkpoint"),
        ("verify", "absent", "no such checkpoint"),
        ("ls", "absent", "no such directory"),
        ("inspect", "", "is a directory of 3 checkpoint(s), not a checkpoint; try {d}/ckpt-4"),
        ("verify", "ckpt-2/{data}/model", f"has no {METADATA_FILE}"),
        ("ls", "ckpt-2", "is itself a checkpoint; list its parent"),
    ],
)
def test_wrong_locations_exit_2_with_a_hint(managed, capsys, command, where, message):
    where = where.format(data=array_dir(managed / "ckpt-2", "save_counter").parent.name)
    path = str(managed / where) if where else str(managed)
    assert main([command, path]) == 2
    err = capsys.readouterr().err
    assert message.format(d=managed) in err and err.startswith(f"dcheckpoint {command}: ")


def test_json_errors_are_json_too(tmp_path, capsys):
    status, out = run_json(capsys, "inspect", str(tmp_path / "nope"))
    assert status == 2 and "no such checkpoint" in out["error"]
