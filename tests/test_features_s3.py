"""Steps, delete, keep-the-best, metadata and ``dcheckpoint rm`` on S3 (a moto server)."""

import json

import numpy as np

import dcheckpoint
from dcheckpoint._cli import main
from dcheckpoint._storage import open_storage
from tests.test_object_storage import bucket, endpoint, scheme  # noqa: F401 (pytest fixtures)


def test_steps_best_fn_delete_and_rm_on_s3(bucket, capsys):  # noqa: F811
    directory = f"{bucket}/run"
    weights = dcheckpoint.Variable(np.zeros(4, np.float32))
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(weights=weights), directory, max_to_keep=2,
        best_fn=lambda m: m["loss"], best_mode="min")
    for step, loss in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.7), (5, 0.8)]:
        weights.assign(np.full(4, step, np.float32))
        manager.save(checkpoint_number=step, metadata={"loss": loss})
    # The two lowest losses (3, 1) plus the latest (5).
    assert manager.all_steps() == [1, 3, 5]
    assert open_storage(directory).list_dir() == ["checkpoint", "ckpt-1", "ckpt-3", "ckpt-5"]
    manager.restore(3)
    np.testing.assert_array_equal(np.asarray(weights.value), np.full(4, 3, np.float32))
    assert dcheckpoint.read_metadata(f"{directory}/ckpt-3").user_metadata == {
        "loss": 0.1, "step": 3}
    manager.delete(1)
    assert manager.all_steps() == [3, 5]
    assert dcheckpoint.get_checkpoint_state(directory).all_model_checkpoint_paths == (
        f"{directory}/ckpt-3", f"{directory}/ckpt-5")
    del manager

    assert main(["ls", directory, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["name"], r["metadata"]["loss"]) for r in rows] == [
        ("ckpt-3", 0.1), ("ckpt-5", 0.8)]
    assert main(["rm", f"{directory}/ckpt-5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state_file_updated"] is True
    assert open_storage(directory).list_dir() == ["checkpoint", "ckpt-3"]
    assert dcheckpoint.latest_checkpoint(directory) == f"{directory}/ckpt-3"
    assert main(["rm", f"{directory}/ckpt-9"]) == 2  # nothing there: refused
