"""Three async saves by 2 processes, assigning between them; each restored and checked."""

import json
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402

prefix = sys.argv[1]
mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
sharding = NamedSharding(mesh, P("x", "y"))


def filled(value):
    return jax.make_array_from_callback((8, 4), sharding,
                                        lambda idx: np.full((8, 4), value, np.float32)[idx])


variable = dcheckpoint.Variable(filled(0.0))
ckpt = dcheckpoint.Checkpoint(v=variable)
options = dcheckpoint.CheckpointOptions(enable_async=True, timeout_secs=60)
paths = []
for step in (1.0, 2.0, 3.0):
    variable.assign(filled(step))
    paths.append(ckpt.save(prefix, options=options))
variable.assign(filled(-1.0))
ckpt.sync()

restored = []
for path in paths:
    target = dcheckpoint.Variable(filled(0.0))
    dcheckpoint.Checkpoint(v=target).restore(path).expect_partial()
    values = {float(np.asarray(s.data).max()) for s in target.value.addressable_shards}
    restored.append(values.pop() if len(values) == 1 else None)
print("RESULT " + json.dumps({"rank": info.process_index, "paths": paths,
                              "restored": restored}), flush=True)
