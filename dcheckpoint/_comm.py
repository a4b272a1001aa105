"""The few collectives the checkpoint engine needs, with bounded waits.

A save is one gather (manifests to the coordinator) and one broadcast (the commit
outcome back), so the engine needs nothing more than :class:`Communicator`. Payloads are
bytes; callers encode JSON. Nothing is ever pickled, so a peer can never make this
process execute code.

Every wait is bounded: a crashed or stuck peer becomes a
:class:`~dcheckpoint.errors.CoordinationTimeoutError` naming the step (``tag``) and the
processes that did not answer, instead of a hang.

Rules for callers (all implementations):
  * every process calls the same collectives in the same order (they are matched by a
    per-instance sequence number, not by ``tag``);
  * one collective at a time per instance: calls are serialised by a lock, so the
    engine's background thread (async saves) may use an instance while the main thread
    does other work, but two threads must not interleave collectives of one instance;
  * construct instances collectively, in the same order on every process.
"""

from __future__ import annotations

import abc
import itertools
import threading
import time

from dcheckpoint.errors import CoordinationError, CoordinationTimeoutError

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "JaxDistributedCommunicator",
    "default_communicator",
]

_FIXES = (
    "possible fixes: look for an earlier error in the other processes' output; make sure "
    "every process makes the same checkpoint calls in the same order; raise "
    "CheckpointOptions(timeout_secs=...) if storage is slow"
)


class _Deadline:
    """A point in time after which a collective gives up."""

    def __init__(self, timeout_secs: float):
        if not timeout_secs > 0:
            raise ValueError(f"timeout_secs must be positive, got {timeout_secs!r}")
        self.timeout_secs = timeout_secs
        self._end = time.monotonic() + timeout_secs

    def remaining_secs(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end


def _timeout_error(
    deadline: _Deadline, tag: str, missing: list[int], *, sending: bool = False
) -> CoordinationTimeoutError:
    if sending:
        waiting = f"waiting for processes {missing} to receive {tag}"
    else:
        waiting = f"waiting for {tag} from processes {missing}"
    return CoordinationTimeoutError(
        f"Timed out after {deadline.timeout_secs:g}s {waiting}: a peer process may have "
        f"crashed or be stuck; {_FIXES}"
    )


class Communicator(abc.ABC):
    """Gather, broadcast and barrier among the processes of one job.

    Process 0 is the coordinator. Subclasses implement ``_gather`` and ``_broadcast``
    against a shared deadline; the barrier is a gather then a broadcast of empty
    payloads, so a timeout can name the processes that never arrived.

    Attributes:
        process_index: this process's index in the job, 0 being the coordinator.
        process_count: number of processes in the job.
    """

    process_index: int
    process_count: int

    def __init__(self, process_index: int, process_count: int):
        self.process_index = process_index
        self.process_count = process_count
        self._lock = threading.Lock()

    @property
    def is_coordinator(self) -> bool:
        """Whether this process collects manifests and commits checkpoints."""
        return self.process_index == 0

    def gather(self, payload: bytes, *, tag: str, timeout_secs: float) -> list[bytes] | None:
        """Sends ``payload`` to the coordinator (all processes).

        Returns:
            On the coordinator, every process's payload in process order; elsewhere None.

        Raises:
            CoordinationTimeoutError: not every payload arrived within ``timeout_secs``.
        """
        with self._lock:
            return self._gather(bytes(payload), tag, _Deadline(timeout_secs))

    def broadcast(self, payload: bytes | None, *, tag: str, timeout_secs: float) -> bytes:
        """Sends the coordinator's ``payload`` to every process (all processes).

        Args:
            payload: the bytes to send on the coordinator; ignored elsewhere.

        Returns:
            The coordinator's payload, on every process.

        Raises:
            ValueError: the coordinator passed None.
            CoordinationTimeoutError: the payload did not arrive within ``timeout_secs``.
        """
        if self.is_coordinator and payload is None:
            raise ValueError(f"the coordinator must pass bytes to broadcast {tag}, got None")
        with self._lock:
            return self._broadcast(
                bytes(payload) if self.is_coordinator else None, tag, _Deadline(timeout_secs)
            )

    def barrier(self, *, tag: str, timeout_secs: float) -> None:
        """Returns once every process has called it (all processes).

        Raises:
            CoordinationTimeoutError: some process did not arrive within ``timeout_secs``.
        """
        deadline = _Deadline(timeout_secs)
        with self._lock:
            self._gather(b"", tag, deadline)
            self._broadcast(b"" if self.is_coordinator else None, tag, deadline)

    @abc.abstractmethod
    def _gather(self, payload: bytes, tag: str, deadline: _Deadline) -> list[bytes] | None:
        """See :meth:`gather`; called with the lock held."""

    @abc.abstractmethod
    def _broadcast(self, payload: bytes | None, tag: str, deadline: _Deadline) -> bytes:
        """See :meth:`broadcast`; ``payload`` is None exactly off the coordinator."""


class LocalCommunicator(Communicator):
    """The single-process job: every collective returns at once."""

    def __init__(self):
        super().__init__(process_index=0, process_count=1)

    def _gather(self, payload, tag, deadline):
        return [payload]

    def _broadcast(self, payload, tag, deadline):
        return payload


def _poll(step, deadline: _Deadline, on_timeout) -> None:
    """Calls ``step()`` until it returns an empty list or the deadline passes.

    ``step`` makes progress without blocking and returns what is still outstanding;
    ``on_timeout(outstanding)`` builds the error. Sleeps grow from 50us to 5ms, so a
    fast exchange costs microseconds and a slow one does not spin a core.
    """
    pause = 5e-5
    while True:
        outstanding = step()
        if not outstanding:
            return
        if deadline.expired():
            raise on_timeout(outstanding)
        time.sleep(min(pause, deadline.remaining_secs()))
        pause = min(pause * 2, 5e-3)


class MPICommunicator(Communicator):
    """Collectives over MPI point-to-point messages, on a private communicator.

    The communicator is a ``Dup()`` of ``comm`` (default ``COMM_WORLD``), so these
    messages never match the user's. Point-to-point sends with ``Iprobe`` polling (rather
    than ``Igather``) let the coordinator name the processes that did not send, and keep
    every wait bounded. Messages are raw byte buffers, never pickled objects.

    mpi4py initialises MPI with thread level ``MULTIPLE`` by default; keep it so. Async
    saves run these collectives on a background thread while the main thread may be in
    the user's MPI calls, which lower thread levels forbid.

    Args:
        comm: an mpi4py communicator; its ranks are the process indices. Construction is
            collective over it.
    """

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        super().__init__(self._comm.Get_rank(), self._comm.Get_size())
        tag_upper_bound = self._comm.Get_attr(MPI.TAG_UB) or 32767
        self._tags = itertools.cycle(range(1, min(tag_upper_bound, 1 << 20)))

    def _gather(self, payload, tag, deadline):
        byte = self._mpi.BYTE
        mpi_tag = next(self._tags)
        if not self.is_coordinator:
            request = self._comm.Isend([payload, byte], dest=0, tag=mpi_tag)
            _poll(
                lambda: [] if request.Test() else [0],
                deadline,
                lambda missing: _timeout_error(deadline, tag, missing, sending=True),
            )
            return None
        received = {0: payload}
        receives = {}  # rank -> (request, buffer) once its message has been probed

        def step():
            for rank in range(1, self.process_count):
                if receives.get(rank) is None:
                    receives[rank] = self._probe_and_receive(rank, mpi_tag)
                if receives[rank] is not None and receives[rank][0].Test():
                    received[rank] = bytes(receives[rank][1])
            return [rank for rank in range(self.process_count) if rank not in received]

        try:
            _poll(step, deadline, lambda missing: _timeout_error(deadline, tag, missing))
        finally:
            for entry in receives.values():
                if entry is not None and not entry[0].Test():
                    entry[0].Cancel()
        return [received[rank] for rank in range(self.process_count)]

    def _probe_and_receive(self, rank: int, mpi_tag: int):
        """Posts the receive of ``rank``'s message if it has arrived, sized to fit it."""
        status = self._mpi.Status()
        if not self._comm.Iprobe(source=rank, tag=mpi_tag, status=status):
            return None
        buffer = bytearray(status.Get_count(self._mpi.BYTE))
        request = self._comm.Irecv([buffer, self._mpi.BYTE], source=rank, tag=mpi_tag)
        return request, buffer

    def _broadcast(self, payload, tag, deadline):
        mpi_tag = next(self._tags)
        if self.is_coordinator:
            sends = {
                rank: self._comm.Isend([payload, self._mpi.BYTE], dest=rank, tag=mpi_tag)
                for rank in range(1, self.process_count)
            }
            _poll(
                lambda: [rank for rank, request in sends.items() if not request.Test()],
                deadline,
                lambda missing: _timeout_error(deadline, tag, missing, sending=True),
            )
            return payload
        slot = [None]

        def step():
            if slot[0] is None:
                slot[0] = self._probe_and_receive(0, mpi_tag)
            return [] if slot[0] is not None and slot[0][0].Test() else [0]

        _poll(step, deadline, lambda missing: _timeout_error(deadline, tag, missing))
        return bytes(slot[0][1])


class JaxDistributedCommunicator(Communicator):
    """Collectives over the key-value store of JAX's coordination service.

    For jobs started with ``jax.distributed.initialize`` but no MPI. Keys are namespaced
    per instance and numbered per collective, so instances and calls never collide. The
    coordinator deletes gathered keys once read, and broadcast keys at the next gather
    (by then every process has moved past the broadcast).

    Raises:
        RuntimeError: ``jax.distributed`` is not initialised in this process.
    """

    _instance_numbers = itertools.count()

    def __init__(self):
        import jax
        from jax._src import distributed

        self._client = distributed.global_state.client
        if self._client is None:
            raise RuntimeError(
                "JaxDistributedCommunicator needs jax.distributed to be initialised; call "
                "launch.initialize() or jax.distributed.initialize() first"
            )
        super().__init__(jax.process_index(), jax.process_count())
        self._namespace = f"dcheckpoint/comm/{next(self._instance_numbers)}"
        self._sequence = itertools.count()
        self._stale_keys: list[str] = []

    def _gather(self, payload, tag, deadline):
        prefix = f"{self._namespace}/{next(self._sequence)}"
        if not self.is_coordinator:
            self._client.key_value_set_bytes(f"{prefix}/{self.process_index}", payload)
            return None
        received = [payload]
        for rank in range(1, self.process_count):
            try:
                received.append(self._get(f"{prefix}/{rank}", tag, deadline, [rank]))
            except CoordinationTimeoutError:
                # Name every sender still missing, not just the first one we waited on.
                present = {key for key, _ in self._client.key_value_dir_get_bytes(prefix + "/")}
                missing = [r for r in range(rank, self.process_count)
                           if f"{prefix}/{r}" not in present]  # fmt: skip
                raise _timeout_error(deadline, tag, missing) from None
        for key in [*(f"{prefix}/{r}" for r in range(1, self.process_count)), *self._stale_keys]:
            self._client.key_value_delete(key)
        self._stale_keys.clear()
        return received

    def _broadcast(self, payload, tag, deadline):
        key = f"{self._namespace}/{next(self._sequence)}/broadcast"
        if self.is_coordinator:
            self._client.key_value_set_bytes(key, payload)
            self._stale_keys.append(key)
            return payload
        return self._get(key, tag, deadline, [0])

    def _get(self, key: str, tag: str, deadline: _Deadline, sender: list[int]) -> bytes:
        """Blocks for ``key`` until the deadline.

        Raises:
            CoordinationTimeoutError: the key did not appear in time.
            CoordinationError: the coordination service failed (e.g. it is gone).
        """
        timeout_ms = max(1, int(deadline.remaining_secs() * 1000))
        try:
            return self._client.blocking_key_value_get_bytes(key, timeout_ms)
        except Exception as error:  # jaxlib raises its own runtime error type
            if "DEADLINE_EXCEEDED" in str(error):
                raise _timeout_error(deadline, tag, sender) from error
            raise CoordinationError(
                f"The coordination service failed while waiting for {tag} from "
                f"processes {sender}: {error}"
            ) from error


_default: Communicator | None = None
_default_lock = threading.Lock()


def default_communicator() -> Communicator:
    """Returns this process's shared communicator, made on first use (collective).

    Local for a single-process job; MPI when MPI launched the job with one rank per JAX
    process (ranks reordered to JAX process indices); otherwise the JAX coordination
    service. The first call must be made by every process.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = _make_default()
        return _default


def _make_default() -> Communicator:
    import jax

    from launch import is_mpi_launched

    if jax.process_count() == 1:
        return LocalCommunicator()
    if is_mpi_launched():
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() == jax.process_count():
            # Ranks ordered by JAX process index, so "process order" means the same thing.
            ordered = MPI.COMM_WORLD.Split(color=0, key=jax.process_index())
            communicator = MPICommunicator(ordered)
            ordered.Free()
            return communicator
    return JaxDistributedCommunicator()
