"""Run by tests/test_process_state.py under ``python -m launch``: per-process input state.

``save DIR``: each process reads its own shard of a real grain pipeline (a dataset
iterator, whose state is JSON, and a DataLoader, whose state is bytes), process ``r``
taking ``r + 1`` batches, then saves with a sharded model on the (4, 2) mesh and prints
the batches it would read next. ``restore DIR``: fresh iterators, restore from the
latest checkpoint, print the batches they read now.
"""

import json
import sys

import launch

info = launch.initialize()

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dcheckpoint import DTensorCheckpoint, Variable, latest_checkpoint  # noqa: E402


def pipelines(rank: int, count: int):
    shard = grain.sharding.ShardOptions(shard_index=rank, shard_count=count)
    dataset = grain.MapDataset.range(64).shuffle(seed=5)[rank::count].batch(2)
    loader = grain.DataLoader(
        data_source=list(range(100, 164)),
        sampler=grain.samplers.IndexSampler(64, shard_options=shard, shuffle=True, seed=2,
                                            num_epochs=1),
        worker_count=0,
    )
    return iter(dataset.to_iter_dataset()), iter(loader)


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    rank, count = info.process_index, info.process_count
    mesh = jax.make_mesh((4, 2), ("x", "y"), devices=jax.devices())
    w = Variable(jax.device_put(np.arange(16.0).reshape(8, 2), NamedSharding(mesh, P("x"))))
    batches, records = pipelines(rank, count)
    ckpt = DTensorCheckpoint(mesh, model={"w": w}, data={"batches": batches,
                                                         "records": records})
    if mode == "save":
        for _ in range(rank + 1):
            next(batches)
            next(records)
        path = ckpt.save(directory + "/ckpt")
    else:
        path = latest_checkpoint(directory)
        ckpt.restore(path).assert_consumed()
    nxt = {"batch": np.asarray(next(batches)).tolist(), "record": int(next(records))}
    print("RESULT " + json.dumps({"rank": rank, "path": path, **nxt}), flush=True)


main()
