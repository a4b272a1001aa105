"""Per-process state: data iterators (real grain) resume where each process stopped."""

from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from dcheckpoint import Checkpoint, CheckpointMismatchError, Variable, latest_checkpoint
from tests.mp_util import results, run_launch

WORKER = Path(__file__).parent / "workers" / "process_state_worker.py"


def _dataset_iter():
    return iter(grain.MapDataset.range(40).shuffle(seed=1).batch(4).to_iter_dataset())


def _loader_iter():
    sampler = grain.samplers.IndexSampler(
        30, shard_options=grain.sharding.NoSharding(), shuffle=True, seed=4, num_epochs=1)
    return iter(grain.DataLoader(data_source=list(range(30)), sampler=sampler,
                                 worker_count=0))


def test_grain_iterators_resume_in_process(tmp_path):
    batches, records = _dataset_iter(), _loader_iter()
    for _ in range(3):
        next(batches), next(records)
    assert isinstance(records.get_state(), bytes)  # DataLoader: bytes; dataset: a dict
    path = Checkpoint(w=Variable(jnp.ones(2)), batches=batches, records=records).save(
        str(tmp_path / "ckpt"))
    expected = (np.asarray(next(batches)), next(records))

    fresh_batches, fresh_records = _dataset_iter(), _loader_iter()
    ckpt = Checkpoint(w=Variable(jnp.zeros(2)), batches=fresh_batches, records=fresh_records)
    ckpt.restore(path).assert_consumed()
    np.testing.assert_array_equal(np.asarray(next(fresh_batches)), expected[0])
    assert next(fresh_records) == expected[1]


class _Unsaveable:
    def get_state(self):
        return {"handle": object()}

    def set_state(self, state):
        raise AssertionError("never restored")


def test_state_that_is_neither_json_nor_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'data/it': get_state\(\) returned a dict that is "
                                         r"neither bytes nor JSON"):
        Checkpoint(data={"it": _Unsaveable()}).write(str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_each_process_resumes_its_own_position_under_mpiexec(tmp_path):
    saved = results(run_launch(WORKER, "save", tmp_path, processes=2, devices_per_process=4))
    restored = results(run_launch(WORKER, "restore", tmp_path, processes=2,
                                  devices_per_process=4))
    assert [r["rank"] for r in restored] == [0, 1]
    for before, after in zip(saved, restored, strict=True):
        assert after["path"] == before["path"] == str(tmp_path / "ckpt-1")
        assert after["batch"] == before["batch"] and after["record"] == before["record"]
    assert saved[0]["batch"] != saved[1]["batch"]  # the two processes were elsewhere

    # One process cannot take over two positions: a clear error naming the iterator.
    one = Checkpoint(w=Variable(jnp.zeros((8, 2))),
                     data={"batches": _dataset_iter(), "records": _loader_iter()})
    with pytest.raises(CheckpointMismatchError,
                       match=r"'data/batches': per-process state saved by 2 processes cannot "
                             r"be restored by 1"):
        one.restore(latest_checkpoint(tmp_path))


def test_async_save_records_the_position_at_save_time(tmp_path):
    from dcheckpoint import CheckpointOptions

    batches = _dataset_iter()
    next(batches)
    ckpt = Checkpoint(batches=batches)
    path = ckpt.save(str(tmp_path / "ckpt"), options=CheckpointOptions(enable_async=True))
    expected = np.asarray(next(batches))  # moves on while the save is in flight
    next(batches)
    ckpt.sync()
    fresh = _dataset_iter()
    Checkpoint(batches=fresh).restore(path).assert_consumed()
    np.testing.assert_array_equal(np.asarray(next(fresh)), expected)


def test_processes_that_disagree_on_per_process_objects_are_refused():
    from dcheckpoint._plan import record_process_values
    from dcheckpoint.errors import CoordinationError

    graph = {"nodes": {"": {"kind": "trackable", "children": ["it"]},
                       "it": {"kind": "process_state"}}, "aliases": {}}
    reports = [{"process": 1, "values": {"it": {"json": 5}}},
               {"process": 0, "values": {"it": {"bytes": "YQ=="}}}]
    merged = record_process_values(graph, reports)
    assert merged["nodes"]["it"]["states"] == [{"bytes": "YQ=="}, {"json": 5}]  # by process
    assert "states" not in graph["nodes"]["it"]  # the caller's graph is not changed
    with pytest.raises(CoordinationError, match=r"'it': processes \[1\] did not save it"):
        record_process_values(graph, [reports[1], {"process": 1, "values": {}}])
