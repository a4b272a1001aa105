"""Run by tests/test_manager.py and tests/test_exporting.py in fresh processes.

Modes:
  continue DIR            a new manager (new process) picks up DIR, restores, saves once.
  mpi DIR                 under ``python -m launch -n 2``: five saves, max_to_keep=2.
  skew DIR                under ``-n 2``: three saves, then a new manager with rank 1's
                          clock two hours behind rank 0's.
  refused DIR             under ``-n 2``, while the test process holds DIR's writer lock.
  export DIR              under ``-n 2``: an ExportingCheckpointManager on a (4, 2) mesh
                          saves three times with max_to_keep=2.
  load ARTIFACT INPUTS    loads an exported artifact and calls it on INPUTS (.npy).

Prints ``RESULT {json}`` lines; the manager's log lines go to stdout prefixed "[rank]".
"""

import json
import logging
import os
import sys
import time

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dcheckpoint._checkpoint import Checkpoint  # noqa: E402
from dcheckpoint._comm import default_communicator  # noqa: E402
from dcheckpoint._exporting import ExportingCheckpointManager, load_savedmodel  # noqa: E402
from dcheckpoint._manager import CheckpointManager  # noqa: E402
from dcheckpoint._options import CheckpointOptions  # noqa: E402
from dcheckpoint._variable import Variable  # noqa: E402

RANK = info.process_index


def report(**facts):
    print("RESULT " + json.dumps({"rank": RANK, **facts}), flush=True)


def names(paths):
    return [os.path.basename(p) for p in paths]


def log_manager_to_stdout():
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[{RANK}] %(message)s"))
    logger = logging.getLogger("dcheckpoint._manager")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def continue_directory(directory):
    checkpoint = Checkpoint(weights=Variable(np.zeros((4,), np.float32)))
    manager = CheckpointManager(checkpoint, directory, max_to_keep=2)
    before = names(manager.checkpoints)
    restored = manager.restore_or_initialize()
    manager.save()
    report(before=before, restored=os.path.basename(restored), after=names(manager.checkpoints))


def save_under_mpi(directory):
    log_manager_to_stdout()
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    data = np.arange(16, dtype=np.float32)
    weights = Variable(jax.make_array_from_callback(data.shape, sharding, lambda i: data[i]))
    manager = CheckpointManager(Checkpoint(weights=weights), directory, max_to_keep=2)
    for n in range(1, 6):
        options = CheckpointOptions(enable_async=n >= 4)
        manager.save(options=options)
    manager.sync()
    default_communicator().barrier(tag="worker done", timeout_secs=60)
    report(checkpoints=names(manager.checkpoints), latest=os.path.basename(
        manager.latest_checkpoint))


def new_manager_with_a_skewed_clock(directory):
    from dcheckpoint import _manager

    manager = CheckpointManager(Checkpoint(weights=Variable(np.zeros((4,), np.float32))),
                                directory, max_to_keep=3)
    for _ in range(3):
        manager.save()
    if RANK == 1:
        _manager._now = lambda: time.time() - 7200.0
    successor = CheckpointManager(Checkpoint(weights=Variable(np.zeros((4,), np.float32))),
                                  directory, max_to_keep=3)
    report(checkpoints=names(successor.checkpoints),
           latest=os.path.basename(successor.latest_checkpoint))


def start_while_locked(directory):
    try:
        CheckpointManager(Checkpoint(weights=Variable(np.zeros((4,), np.float32))),
                          directory, max_to_keep=2)
    except Exception as error:  # noqa: BLE001 - the test checks what each rank raised
        report(error=f"{type(error).__name__}: {error}")


def export_under_mpi(directory):
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    values = np.arange(32, dtype=np.float32).reshape(4, 8) / 32
    w = Variable(jax.make_array_from_callback(
        (4, 8), NamedSharding(mesh, P(None, "x")), lambda idx: values[idx]))
    manager = ExportingCheckpointManager(
        Checkpoint(w=w), directory, 2,
        serving_fn=lambda params, x: jnp.tanh(x @ params["w"]),
        params_fn=lambda: {"w": w.value},
        input_specs=[jax.ShapeDtypeStruct((3, 4), jnp.float32)],
    )
    for _ in range(3):
        w.assign(w.value + 1.0)
        manager.save()
    manager.sync()
    report(checkpoints=names(manager.checkpoints), savedmodels=names(manager.savedmodels),
           latest=os.path.basename(manager.latest_savedmodel),
           on_disk=sorted(n for n in os.listdir(directory) if not n.startswith(".")))


def load_and_call(artifact, inputs_path):
    inputs = np.load(inputs_path, allow_pickle=False)
    outputs = load_savedmodel(artifact)(inputs)
    report(outputs=np.asarray(outputs).tolist(), dtype=str(np.asarray(outputs).dtype))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {
        "continue": continue_directory,
        "mpi": save_under_mpi,
        "skew": new_manager_with_a_skewed_clock,
        "refused": start_while_locked,
        "export": export_under_mpi,
        "load": load_and_call,
    }[mode](*args)
