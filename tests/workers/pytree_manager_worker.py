"""Run by tests/test_jax_flows.py under ``python -m launch -n 2``: PytreeManager across
processes.

Both processes save steps 1..4 (async) of a state sharded over every device, resume
from a ``jax.eval_shape`` target on a mesh of the other shape, then make one save with
a step that differs between the processes: every process must raise the same
CoordinationError and nothing may be written. One ``RESULT {json}`` line per process.
"""

import json
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402

directory = sys.argv[1]


def state_on(mesh, step):
    sharding = NamedSharding(mesh, P("x", "y"))
    w = jax.make_array_from_callback(
        (8, 4), sharding, lambda i: np.arange(32, dtype=np.float32).reshape(8, 4)[i] * step)
    return {"w": w, "key": jax.random.key(step), "step": jnp.int32(step)}


saving = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
options = dcheckpoint.CheckpointOptions(enable_async=True)
with dcheckpoint.PytreeManager(directory, max_to_keep=2, options=options) as manager:
    for step in range(1, 5):
        manager.save(step, state_on(saving, step), metadata={"loss": jnp.float32(step)})

resuming = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
manager = dcheckpoint.PytreeManager(directory, max_to_keep=2)
abstract = jax.eval_shape(lambda: state_on(resuming, 0))
# Under auto axes eval_shape keeps no sharding: give w the new mesh's, as Orbax users do.
abstract["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                     sharding=NamedSharding(resuming, P("x", "y")))
restored = manager.restore(target=abstract)
gathered = multihost_utils.process_allgather(restored["w"], tiled=True)
try:
    manager.save(10 + info.process_index, state_on(resuming, 5))
    mismatch = "none"
except dcheckpoint.CoordinationError as error:
    mismatch = f"{type(error).__name__}: {error}"
print("RESULT " + json.dumps({
    "rank": info.process_index, "steps": manager.all_steps(),
    "metadata": manager.metadata(), "w_ok": bool(np.array_equal(
        np.asarray(gathered), np.arange(32, dtype=np.float32).reshape(8, 4) * 4)),
    "w_mesh": dict(restored["w"].sharding.mesh.shape),
    "key": np.asarray(jax.random.key_data(restored["key"])).tolist(),
    "expected_key": np.asarray(jax.random.key_data(jax.random.key(4))).tolist(),
    "mismatch": mismatch, "steps_after": manager.all_steps(),
}), flush=True)
manager.close()
