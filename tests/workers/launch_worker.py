"""Run by tests/test_launch.py under ``python -m launch``: reports what each rank sees."""

import json

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

mesh = jax.make_mesh((4, 2), ("x", "y"), devices=jax.devices())
sharding = NamedSharding(mesh, P("x", "y"))
global_values = np.arange(32, dtype=np.int32).reshape(8, 4)
array = jax.make_array_from_callback((8, 4), sharding, lambda index: global_values[index])
shards = sorted(
    (
        [[s.start, s.stop] for s in shard.index],
        np.asarray(shard.data).tolist(),
    )
    for shard in array.addressable_shards
)
result = {
    "rank": info.process_index,
    "process_count": info.process_count,
    "jax_process_index": jax.process_index(),
    "jax_process_count": jax.process_count(),
    "global_devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "mesh_device_ids": [[d.id for d in row] for row in mesh.devices],
    "shards": shards,
    "initialize_again": list(
        (lambda again: (again.process_index, again.process_count))(launch.initialize())
    ),
}
print("RESULT " + json.dumps(result), flush=True)
