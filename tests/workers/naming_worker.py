"""Saves sharded arrays under unusual key names with 2 processes, then restores them onto
another mesh through target_from_metadata; prints what each process checked.

usage: naming_worker.py DIR
"""

import json
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402

KEYS = ["sp ace", "a/b", "W", "w", "日本語の鍵" * 6, "ü" * 100, ""]


def expected(i):
    return np.arange(8 * 4, dtype=np.float32).reshape(8, 4) + 100 * i


def mesh(shape):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


directory = sys.argv[1]
saved_on = NamedSharding(mesh((4, 2)), P("data", "model"))
tree = {key: jax.make_array_from_callback((8, 4), saved_on, lambda idx, i=i: expected(i)[idx])
        for i, key in enumerate(KEYS)}
path = dcheckpoint.Checkpoint(t=tree).save(directory)

target = dcheckpoint.target_from_metadata(path, mesh((2, 4)))
out = dcheckpoint.restore_pytree(path, target)
bad = []
for i, key in enumerate(KEYS):
    value = out["t"][key]
    if value.sharding.spec != P("data", "model"):
        bad.append([key, str(value.sharding.spec)])
    for shard in value.addressable_shards:
        if np.asarray(shard.data).tobytes() != expected(i)[shard.index].tobytes():
            bad.append([key, str(shard.index)])
print("RESULT " + json.dumps({"rank": info.process_index, "path": path, "bad": bad,
                              "keys": sorted(out["t"])}), flush=True)
