"""Run by tests/test_preemption.py under ``python -m launch -n 2``: ranks that disagree.

1. rank 0 calls ``delete(1)``, rank 1 ``delete(3)``: nothing is deleted and both
   ranks raise CoordinationError (neither believes its step is gone).
2. with ``save_on_preemption`` (JAX's preemption service on or off), rank 0
   asks at steps 5, 7 and rank 1 at 6, 8: both must raise CoordinationError.
Prints one ``RESULT {json}`` line per process.
"""

import json
import sys

import launch

info = launch.initialize()

import numpy as np  # noqa: E402

from dcheckpoint import CheckpointManager, CoordinationError  # noqa: E402
from dcheckpoint._checkpoint import Checkpoint  # noqa: E402
from dcheckpoint._variable import Variable  # noqa: E402

rank = info.process_index
manager = CheckpointManager(Checkpoint(w=Variable(np.zeros(2, np.float32))), sys.argv[1],
                            max_to_keep=None, save_on_preemption=True)
for step in (1, 2, 3):
    manager.save(checkpoint_number=step)


def outcome(call):
    try:
        return f"returned {call()!r}"
    except CoordinationError as error:
        return f"{type(error).__name__}: {error}"


deleted = outcome(lambda: manager.delete(1 if rank == 0 else 3))
# The first answer comes from no exchange (own mode answers one step late), so the
# disagreement at steps 5 and 6 is raised by the next call, on both ranks.
first = manager.reached_preemption(5 + rank)
preemption = outcome(lambda: manager.reached_preemption(7 + rank))
print("RESULT " + json.dumps({
    "rank": rank, "deleted": deleted, "first": first, "preemption": preemption,
    "uses_jax": manager._preemption.uses_jax, "steps": manager.all_steps(),
    "checkpoints": [p.rsplit("/", 1)[-1] for p in manager.checkpoints],
}), flush=True)
