"""Run by tests/test_manager_steps.py under ``python -m launch -n 2``: delete and restore steps.

Both processes save steps 1..3 of an 8-element array sharded over every device, restore
step 2, delete it (collectively), then delete it again: every process must raise
CheckpointNotFoundError. Prints one ``RESULT {json}`` line per process.
"""

import json
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dcheckpoint import CheckpointManager, CheckpointNotFoundError  # noqa: E402
from dcheckpoint._checkpoint import Checkpoint  # noqa: E402
from dcheckpoint._variable import Variable  # noqa: E402

directory = sys.argv[1]
mesh = jax.make_mesh((jax.device_count(),), ("x",))
sharding = NamedSharding(mesh, P("x"))


def full(value):
    return jax.make_array_from_callback((8,), sharding,
                                        lambda index: np.full(8, value, np.float32)[index])


weights = Variable(full(0.0))
manager = CheckpointManager(Checkpoint(weights=weights), directory, max_to_keep=None)
for step in (1, 2, 3):
    weights.assign(full(float(step)))
    manager.save(checkpoint_number=step)
steps_before = manager.all_steps()
manager.restore(2)
restored = np.asarray(jax.experimental.multihost_utils.process_allgather(
    weights.value, tiled=True)).tolist()
manager.delete(2)
try:
    manager.delete(2)
    missing_error = "none"
except CheckpointNotFoundError as error:
    missing_error = f"{type(error).__name__}: {error}"
print("RESULT " + json.dumps({
    "rank": info.process_index, "steps_before": steps_before,
    "steps_after": manager.all_steps(), "latest_after": manager.latest_step(),
    "restored": restored, "missing_error": missing_error,
}), flush=True)
