"""``launch.initialize()``: turn an ``mpiexec``-started set of processes into one JAX job.

Protocol (run by every process, in this order):
  1. (all ranks) read rank and size from MPI; with size 1 there is nothing to join.
  2. (all ranks) allgather hostnames, to know whether the job spans several hosts.
  3. (rank 0) pick a free port and an address the others can reach; broadcast it.
  4. (all ranks) duplicate ``COMM_WORLD`` into a private communicator for libraries
     (:func:`private_mpi_comm`): made here, where every process is known to be, so a
     library never needs an unbounded collective set-up later.
  5. (all ranks) select gloo for CPU collectives, then ``jax.distributed.initialize``.

mpi4py is imported only when the environment says an MPI launcher started us, because
importing it calls ``MPI_Init``. mpi4py initialises MPI with thread level MULTIPLE by
default; the checkpoint engine relies on that (async saves run collectives on a
background thread while the main thread may run the user's MPI calls), so keep it.
Raw byte buffers are exchanged here, never pickled objects.
"""

from __future__ import annotations

import dataclasses
import os
import socket

from launch._devices import backends_started

__all__ = ["LaunchInfo", "initialize", "is_mpi_launched", "private_mpi_comm",
           "COORDINATOR_HOST_ENV"]

COORDINATOR_HOST_ENV = "DCHECKPOINT_COORDINATOR_HOST"

# Set by the launchers we support: MPICH hydra (PMI_*), Open MPI (OMPI_*), PMIx (PMIX_*).
_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
_NAME_BYTES = 256  # fixed width for hostnames / addresses exchanged over MPI
_PRIVATE_COMM = None  # see private_mpi_comm


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchInfo:
    """Where this process stands in the job.

    Attributes:
        process_index: this process's index, 0 being the coordinator.
        process_count: number of processes in the job.
    """

    process_index: int
    process_count: int


def is_mpi_launched() -> bool:
    """Returns whether an MPI launcher (mpirun/mpiexec) started this process.

    Looks only at the environment, so it never initialises MPI.
    """
    return any(name in os.environ for name in _MPI_ENV_VARS)


def private_mpi_comm():
    """A duplicate of ``COMM_WORLD`` that :func:`initialize` made, or None.

    None unless ``initialize()`` joined a multi-process job over MPI. Its ranks are the
    JAX process indices. dcheckpoint sends its messages on it, so they never match the
    user's, without a ``Dup`` of its own (a collective that would wait without bound if
    one process made a checkpoint call alone).
    """
    return _PRIVATE_COMM


def initialize(timeout_secs: int = 300) -> LaunchInfo:
    """Joins this process to the multi-process JAX job that mpiexec started.

    Idempotent: a second call (or a call after the user ran ``jax.distributed.initialize``
    themselves) returns the current job's info. Outside MPI, or under ``mpiexec -n 1``,
    it does nothing. Must run before JAX initialises its backend.

    Args:
        timeout_secs: how long ``jax.distributed.initialize`` waits for every process to
            connect to the coordinator.

    Returns:
        This process's index and the job's process count.

    Raises:
        RuntimeError: JAX's backend already started as a single process while MPI
            reports several ranks, so this process can no longer join the job.
    """
    state = jax_distributed_state()
    if state is not None:
        return LaunchInfo(state.process_id, state.num_processes)
    if not is_mpi_launched():
        return LaunchInfo(0, 1)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return LaunchInfo(0, 1)
    _refuse_if_backend_started(rank, size)
    address = _agree_on_coordinator_address(comm)
    global _PRIVATE_COMM
    _PRIVATE_COMM = comm.Dup()
    _select_cpu_collectives()
    import jax

    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=size,
        process_id=rank,
        initialization_timeout=int(timeout_secs),
    )
    return LaunchInfo(rank, size)


def jax_distributed_state():
    """``jax.distributed``'s state (``process_id``, ``num_processes``, ``client``: its
    key-value store), or None when it is not initialised.

    Read from JAX's private ``jax._src.distributed.global_state``, as JAX's own
    ``multihost_utils`` does: ``jax.distributed.is_initialized()`` is public but says
    nothing more, ``jax.process_index()``/``jax.process_count()`` start the backend (a
    collective wait on every process's devices, which callers here must not start), and
    the key-value client has no public accessor at all.
    """
    import jax

    if not jax.distributed.is_initialized():
        return None
    from jax._src import distributed

    return distributed.global_state


def _refuse_if_backend_started(rank: int, size: int) -> None:
    if backends_started():
        raise RuntimeError(
            f"launch.initialize() on MPI rank {rank} of {size} was called after JAX "
            "initialised its backend, so this process can no longer join a multi-process "
            "job. Call launch.initialize() first thing in the script, before anything "
            "touches JAX devices or creates arrays."
        )


def _agree_on_coordinator_address(comm) -> str:
    """Returns "host:port" of the coordinator, the same on every rank (collective)."""
    import numpy as np
    from mpi4py import MPI

    hostnames = np.zeros((comm.Get_size(), _NAME_BYTES), dtype=np.uint8)
    comm.Allgather([_fixed_width(socket.gethostname()), MPI.BYTE], [hostnames, MPI.BYTE])
    address = np.zeros(_NAME_BYTES, dtype=np.uint8)
    if comm.Get_rank() == 0:
        one_host = len({row.tobytes() for row in hostnames}) == 1
        host = os.environ.get(COORDINATOR_HOST_ENV) or (
            "127.0.0.1" if one_host else socket.gethostname()
        )
        address = _fixed_width(f"{host}:{_free_port(host)}")
    comm.Bcast([address, MPI.BYTE], root=0)
    return address.tobytes().rstrip(b"\0").decode()


def _fixed_width(text: str):
    import numpy as np

    raw = text.encode()
    if len(raw) >= _NAME_BYTES:
        raise ValueError(f"host name {text!r} is longer than {_NAME_BYTES - 1} bytes")
    buffer = np.zeros(_NAME_BYTES, dtype=np.uint8)
    buffer[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return buffer


def _free_port(host: str) -> int:
    """Asks the OS for a free TCP port; the coordinator binds it moments later."""
    bind_host = "127.0.0.1" if host in ("127.0.0.1", "localhost") else ""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((bind_host, 0))
        return sock.getsockname()[1]


def _select_cpu_collectives() -> None:
    """Uses gloo for cross-process collectives on CPU.

    The option only affects the CPU client, so it is harmless when the job runs on GPUs;
    we skip it only when JAX_PLATFORMS rules CPU out.
    """
    import jax

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if not platforms or "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
