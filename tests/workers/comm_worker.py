"""Run by tests/test_comm.py under ``python -m launch``: exercises the communicators.

Prints ``RESULT {json}`` per rank with what each collective returned, and the messages of
the timeouts provoked by a rank that skips a collective.
"""

import json
import threading

import launch

info = launch.initialize()

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from dcheckpoint import _comm  # noqa: E402
from dcheckpoint.errors import CoordinationError, CoordinationTimeoutError  # noqa: E402

RANK, SIZE = info.process_index, info.process_count
LAST = SIZE - 1
SHORT_SECS = 0.5


def payload_of(rank: int) -> bytes:
    # Sizes from 0 bytes of padding to 400 KB, so large messages take MPI's rendezvous path.
    return json.dumps({"rank": rank, "pad": "x" * (rank * 200_000)}).encode()


def exercise(comm) -> dict:
    gathered = comm.gather(payload_of(RANK), tag="test gather", timeout_secs=30)
    message = b"decision" if comm.is_coordinator else None
    received = comm.broadcast(message, tag="test broadcast", timeout_secs=30)
    comm.barrier(tag="test barrier", timeout_secs=30)
    return {
        "gathered": None
        if gathered is None
        else [[len(p), json.loads(p)["rank"]] for p in gathered],
        "broadcast": received.decode(),
        "index": comm.process_index,
        "count": comm.process_count,
    }


def exercise_beside_user_mpi(comm) -> str:
    """A collective on a background thread while the main thread runs user MPI calls."""
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            value=comm.broadcast(b"background" if RANK == 0 else None, tag="bg", timeout_secs=30)
        )
    )
    thread.start()
    total = np.zeros(1, dtype=np.int64)
    MPI.COMM_WORLD.Allreduce(np.array([RANK], dtype=np.int64), total)
    thread.join()
    return f"{outcome['value'].decode()}:{int(total[0])}"


def follow_up(comm) -> str | None:
    """The next collective after a timeout: it must fail at once, on every process."""
    try:
        comm.barrier(tag="the next collective", timeout_secs=30)
    except CoordinationError as error:
        return f"{type(error).__name__}: {error}"
    return None


def provoke_timeouts(make_comm) -> dict:
    """The last rank skips a gather, then the coordinator skips a broadcast; after each,
    every process's next collective must fail at once saying the job must restart."""
    comm = make_comm()
    errors = {}
    if RANK != LAST:
        try:
            comm.gather(b"here", tag="save manifests", timeout_secs=SHORT_SECS)
            errors["gather"] = None
        except CoordinationTimeoutError as error:
            errors["gather"] = str(error)
    MPI.COMM_WORLD.Barrier()  # the user's world: unaffected by our failed collective
    errors["after_gather"] = follow_up(comm)
    MPI.COMM_WORLD.Barrier()
    comm = make_comm()
    if RANK != 0:
        try:
            comm.broadcast(None, tag="commit outcome", timeout_secs=SHORT_SECS)
            errors["broadcast"] = None
        except CoordinationError as error:  # a timeout, or a peer's abort after its own
            errors["broadcast"] = str(error)
    MPI.COMM_WORLD.Barrier()
    errors["after_broadcast"] = follow_up(comm)
    MPI.COMM_WORLD.Barrier()
    return errors


default = _comm.default_communicator()
jax_comm = _comm.JaxDistributedCommunicator()
result = {
    "rank": RANK,
    "default_type": type(default).__name__,
    "default_is_cached": _comm.default_communicator() is default,
    "mpi": exercise(default),
    "jax": exercise(jax_comm),
    "beside_user_mpi": exercise_beside_user_mpi(default),
    "mpi_timeouts": provoke_timeouts(_comm.MPICommunicator),
    "jax_timeouts": provoke_timeouts(_comm.JaxDistributedCommunicator),
}
print("RESULT " + json.dumps(result), flush=True)
