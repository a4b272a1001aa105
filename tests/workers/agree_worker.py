"""Run by tests/test_coordination_integrity.py under ``python -m launch``.

usage: agree_worker.py paths DIR
       agree_worker.py kinds DIR
       agree_worker.py metadata DIR
       agree_worker.py failed_here DIR
       agree_worker.py alone DIR RANK mpi|jax first|later
Prints ``RESULT {json}`` per rank.
"""

import json
import os
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import dcheckpoint  # noqa: E402
from dcheckpoint import _comm, _engine  # noqa: E402

RANK = info.process_index
mode, directory = sys.argv[1:3]
# Start JAX's backend on every process now, as a training job has by its first
# checkpoint call (starting it is itself a wait for every process's devices).
jax.devices()


def failure(call, kinds=dcheckpoint.CheckpointError) -> tuple[str | None, str | None]:
    """(error type, message) if ``call`` raised one of ``kinds``, else (None, None)."""
    try:
        call()
    except kinds as error:
        return type(error).__name__, str(error)
    return None, None


def report(**facts):
    print("RESULT " + json.dumps({"rank": RANK, **facts}), flush=True)


if mode == "paths":
    tree = {"w": np.ones(8, np.float32)}
    first = os.path.join(directory, "first")
    dcheckpoint.save_pytree(first, tree)
    before = sorted(os.listdir(first))
    # The case: same tree, different paths on the two processes.
    target = os.path.join(directory, "best" if RANK == 0 else "ckpt-2")
    kind, error = failure(lambda: dcheckpoint.save_pytree(target, tree))
    after = os.path.join(directory, "after")
    dcheckpoint.save_pytree(after, tree)
    report(type=kind, error=error,
           first=dcheckpoint.restore_pytree(first, {"w": None})["w"].tolist(),
           first_unchanged=sorted(os.listdir(first)) == before,
           after=dcheckpoint.restore_pytree(after, {"w": None})["w"].tolist())
elif mode == "kinds":
    # Rank 0 saves a pytree while rank 1 starts a manager: different kinds of call.
    tree = {"w": np.ones(8, np.float32)}
    if RANK == 0:
        kind, error = failure(lambda: dcheckpoint.save_pytree(
            os.path.join(directory, "tree"), tree))
    else:
        checkpoint = dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.ones(8, np.float32)))
        kind, error = failure(lambda: dcheckpoint.CheckpointManager(
            checkpoint, os.path.join(directory, "run"), max_to_keep=1))
    after = dcheckpoint.save_pytree(os.path.join(directory, "after"), tree)
    report(type=kind, error=error, after=after)
elif mode == "metadata":
    # Each rank passes its own (unreduced) loss: only one dict could be stored.
    step = dcheckpoint.Variable(np.int32(1))
    manager = dcheckpoint.CheckpointManager(dcheckpoint.Checkpoint(step=step), directory,
                                            max_to_keep=3)
    kind, error = failure(lambda: manager.save(
        checkpoint_number=1, metadata={"lr": 0.1, "loss": 0.5 + RANK, "host": f"h{RANK}"}))
    committed = manager.save(checkpoint_number=2, metadata={"lr": 0.1, "loss": 0.5})
    report(type=kind, error=error, steps=manager.all_steps(), committed=committed,
           stored=dcheckpoint.read_metadata(committed).user_metadata,
           listing=sorted(n for n in os.listdir(directory) if not n.startswith(".")))
elif mode == "failed_here":
    # Rank 1 fails before the save's first collective; rank 0 is already in it (with the
    # default 600 s timeout: waiting it out would outlast the test's 120 s).
    def refused(call) -> tuple[str | None, str | None]:
        return failure(call, Exception)  # rank 1's own error is a ValueError

    leaf = object() if RANK == 1 else np.ones(4, np.float32)  # not a savable leaf on 1
    pytree = refused(lambda: dcheckpoint.save_pytree(os.path.join(directory, "tree"),
                                                     {"w": np.ones(8, np.float32), "x": leaf}))
    checkpoint = dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.ones(8, np.float32)))
    metadata = {"seen": {1, 2}} if RANK == 1 else {"seen": [1, 2]}  # a set: not JSON
    written = refused(lambda: checkpoint.write(os.path.join(directory, "ckpt"),
                                               metadata=metadata))
    saved = refused(lambda: checkpoint.save(os.path.join(directory, "run/ckpt"),
                                            metadata=metadata))
    after = dcheckpoint.save_pytree(os.path.join(directory, "after"),
                                    {"w": np.ones(8, np.float32)})
    counter = int(checkpoint.save_counter.value)
    manager = dcheckpoint.CheckpointManager(checkpoint, os.path.join(directory, "run"),
                                            max_to_keep=2)
    managed = refused(lambda: manager.save(metadata=metadata))
    resumed = manager.save(metadata={"seen": [1, 2]})  # alike: numbered 1 on both
    exporter = dcheckpoint.ExportingCheckpointManager(
        dcheckpoint.Checkpoint(w=dcheckpoint.Variable(np.ones(4, np.float32))),
        os.path.join(directory, "export"), max_to_keep=2,
        serving_fn=lambda params, x: x * params["w"], params_fn=lambda: {"w": np.ones(4)},
        input_specs=[jax.ShapeDtypeStruct((4,), np.float32)])
    exported = refused(lambda: exporter.save(metadata=metadata))
    exported_after = exporter.save(metadata={"seen": [1, 2]})
    report(pytree=pytree, written=written, saved=saved, managed=managed, after=after,
           counter=counter, resumed=resumed, steps=manager.all_steps(), exported=exported,
           exported_after=exported_after,
           export_listing=sorted(n for n in os.listdir(os.path.join(directory, "export"))
                                 if not n.startswith(".")),
           listing=sorted(os.listdir(directory)))
else:
    alone, kind, when = int(sys.argv[3]), sys.argv[4], sys.argv[5]
    comm = _comm.JaxDistributedCommunicator() if kind == "jax" else None

    def save(name, timeout_secs):
        options = dcheckpoint.CheckpointOptions(timeout_secs=timeout_secs)
        tree = {"w": np.ones(8, np.float32)}
        if comm is None:  # the default communicator, made by this very call
            return dcheckpoint.save_pytree(os.path.join(directory, name), tree,
                                           options=options)
        return _engine.save_arrays(os.path.join(directory, name), tree, options=options,
                                   comm=comm)

    facts = {}
    if when == "later":  # a matched save first: the lone one is not the job's first
        facts["warm"] = save("warm", 20)
    if RANK == alone:
        facts["alone_type"], facts["alone_error"] = failure(lambda: save("solo", 2))
    total = np.zeros(1, np.int64)
    MPI.COMM_WORLD.Allreduce(np.ones(1, np.int64), total)
    facts["user_mpi"] = int(total[0]) // info.process_count
    facts["next_type"], facts["next_error"] = failure(lambda: save("next", 20))
    facts["later_type"], _ = failure(lambda: save("later", 20))
    report(**facts)
