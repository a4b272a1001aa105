"""Run by tests/test_object_storage.py under ``python -m launch``, against an S3 server.

usage: s3_worker.py save URL MESH     a manager (max_to_keep=2) saves 3 times on MESH
       s3_worker.py restore URL MESH  a new manager restores the latest onto MESH

The endpoint and credentials come from the environment the test sets. Values are a
function of the global index and the step, so each process checks only its own shards.
Prints ``RESULT {json}`` lines.
"""

import json
import os
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402

SHAPE = (16, 8)


def expected(step):
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1000 * step


def make_mesh(text):
    dims = tuple(int(d) for d in text.split("x"))
    return jax.make_mesh(dims, ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def report(**facts):
    print("RESULT " + json.dumps({"rank": info.process_index, **facts}), flush=True)


def variable(sharding, step):
    values = expected(step)
    return dcheckpoint.Variable(
        jax.make_array_from_callback(SHAPE, sharding, lambda idx: values[idx]))


def save(url, mesh_text):
    sharding = NamedSharding(make_mesh(mesh_text), P("x", "y"))
    weights = variable(sharding, 0)
    checkpoint = dcheckpoint.Checkpoint(weights=weights)
    manager = dcheckpoint.CheckpointManager(checkpoint, url, max_to_keep=2)
    for step in (1, 2, 3):
        weights.assign(variable(sharding, step).value)
        manager.save()
    report(checkpoints=[os.path.basename(p) for p in manager.checkpoints],
           latest=manager.latest_checkpoint)


def restore(url, mesh_text):
    # The transposed spec: the saved (x, y) layout lands on a different one.
    sharding = NamedSharding(make_mesh(mesh_text), P("y", "x"))
    weights = variable(sharding, 0)
    manager = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(weights=weights), url, max_to_keep=2)
    restored = manager.restore_or_initialize()
    want = expected(3)
    bad = [str(s.device) for s in weights.value.addressable_shards
           if not np.array_equal(np.asarray(s.data), want[s.index])]
    report(restored=restored, bad=bad, checked=len(weights.value.addressable_shards),
           same_sharding=weights.value.sharding == sharding)


if __name__ == "__main__":
    mode, url, mesh_text = sys.argv[1:4]
    {"save": save, "restore": restore}[mode](url, mesh_text)
