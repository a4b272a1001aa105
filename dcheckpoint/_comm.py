"""The job's collectives: one ordered executor, one "agree" step, bounded waits.

Every checkpoint collective of a process (saves, ``save_pytree``, a manager's start,
an export) runs on one background thread, in the order the process issued it
(:func:`submit`, :func:`run_ordered`). That single order is what keeps the collectives
of consecutive calls matched across processes, whichever thread made them.

Each protocol step is one :func:`agree`: every process sends a small JSON value to the
coordinator, the coordinator decides (or fails), and every process gets back the same
value or raises the same error type with the same message. A save is two of them (its
identity, then its outcome), so its coordination cost grows with the number of
processes, never with the bytes saved.

Payloads are bytes framed with a magic and the collective's sequence number, so a stale
or misrouted message is recognised, never mis-decoded. Nothing is ever pickled, so a
peer can never make this process execute code.

Every wait is bounded: a crashed or stuck peer becomes a
:class:`~dcheckpoint.errors.CoordinationTimeoutError` naming the step (``tag``) and the
processes that did not answer, instead of a hang. A collective that times out leaves
the processes out of step (one side has sent or consumed messages the other never
will), so it *breaks* the communicator: this process and, through an abort message,
every peer fail every later collective at once with a :class:`CoordinationError` that
says the job must restart, instead of pairing one save's messages with another's.

Rules for callers (all implementations):
  * every process calls the same collectives in the same order (they are matched by a
    per-instance sequence number, not by ``tag``); use :func:`agree` through
    :func:`run_ordered` rather than raw gathers and broadcasts;
  * one collective at a time per instance (a lock serialises them).
"""

from __future__ import annotations

import abc
import itertools
import json
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from dcheckpoint import errors
from dcheckpoint.errors import CheckpointError, CoordinationError, CoordinationTimeoutError

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "JaxDistributedCommunicator",
    "default_communicator",
    "agree",
    "submit",
    "run_ordered",
    "error_kind",
]

_FIXES = (
    "possible fixes: look for an earlier error in the other processes' output; make sure "
    "every process makes the same checkpoint calls in the same order; raise "
    "CheckpointOptions(timeout_secs=...) if storage is slow"
)
_RESTART = (
    "the job's processes are out of step, so every later checkpoint call fails: restart "
    "the job (every process) and resume from its latest checkpoint"
)

# A frame: magic, then the sender's sequence number of the collective, then the payload.
_FRAME = struct.Struct("!4sQ")
_DATA_MAGIC = b"dck\x01"
_ABORT_MAGIC = b"dck\x02"


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
        f"crashed or be stuck; {_FIXES}. Checkpointing in this job cannot continue: "
        f"{_RESTART}"
    )


def _frame(sequence: int, payload: bytes, magic: bytes = _DATA_MAGIC) -> bytes:
    return _FRAME.pack(magic, sequence) + payload


def _unframe(message: bytes, sequence: int, sender: int, tag: str) -> bytes:
    """The payload of a data frame, checked to belong to collective ``sequence``.

    Raises:
      CoordinationError: the message is not ours or belongs to another collective.
    """
    if len(message) < _FRAME.size:
        found = "a message too short to be ours"
    else:
        magic, their_sequence = _FRAME.unpack_from(message)
        if magic == _DATA_MAGIC and their_sequence == sequence:
            return message[_FRAME.size:]
        found = (f"collective #{their_sequence}" if magic == _DATA_MAGIC
                 else f"a message with magic {magic!r}")
    raise CoordinationError(
        f"Process {sender} sent {found} where this process expected collective "
        f"#{sequence} ({tag}): {_RESTART}"
    )


def _short(error: BaseException) -> str:
    """``error``'s message without the advice every one of ours ends with."""
    text = str(error)
    for advice in (f". Checkpointing in this job cannot continue: {_RESTART}", f"; {_RESTART}",
                   f": {_RESTART}"):
        text = text.removesuffix(advice)
    return text


class Communicator(abc.ABC):
    """Gather, broadcast and barrier among the processes of one job.

    Process 0 is the coordinator. Subclasses implement ``_gather`` and ``_broadcast``
    against a shared deadline and frame their messages with the collective's sequence
    number (``_frame``/``_unframe``); the barrier is a gather then a broadcast of empty
    payloads, so a timeout can name the processes that never arrived. Subclasses also
    carry abort messages (``_send_abort``, ``_received_abort``).

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
        self._sequence = 0  # collectives started by this instance
        self._broken: str | None = None  # why this instance stopped, once it did
        self.agreements = 0  # agree() calls made through this instance

    @property
    def is_coordinator(self) -> bool:
        """Whether this process collects manifests and commits checkpoints."""
        return self.process_index == 0

    @property
    def broken(self) -> str | None:
        """Why every collective of this instance now fails, or None while it works."""
        return self._broken

    def gather(self, payload: bytes, *, tag: str, timeout_secs: float) -> list[bytes] | None:
        """Sends ``payload`` to the coordinator (all processes).

        Returns:
            On the coordinator, every process's payload in process order; elsewhere None.

        Raises:
            CoordinationTimeoutError: not every payload arrived within ``timeout_secs``.
            CoordinationError: the job is out of step (see the module docstring).
        """
        payload = bytes(payload)
        return self._run(lambda seq, deadline: self._gather(payload, tag, deadline, seq),
                         tag, timeout_secs)

    def broadcast(self, payload: bytes | None, *, tag: str, timeout_secs: float) -> bytes:
        """Sends the coordinator's ``payload`` to every process (all processes).

        Args:
            payload: the bytes to send on the coordinator; ignored elsewhere.

        Returns:
            The coordinator's payload, on every process.

        Raises:
            ValueError: the coordinator passed None.
            CoordinationTimeoutError: the payload did not arrive within ``timeout_secs``.
            CoordinationError: the job is out of step (see the module docstring).
        """
        if self.is_coordinator and payload is None:
            raise ValueError(f"the coordinator must pass bytes to broadcast {tag}, got None")
        payload = bytes(payload) if self.is_coordinator else None
        return self._run(lambda seq, deadline: self._broadcast(payload, tag, deadline, seq),
                         tag, timeout_secs)

    def barrier(self, *, tag: str, timeout_secs: float) -> None:
        """Returns once every process has called it (all processes).

        Raises:
            CoordinationTimeoutError: some process did not arrive within ``timeout_secs``.
        """
        self.gather(b"", tag=tag, timeout_secs=timeout_secs)
        self.broadcast(b"" if self.is_coordinator else None, tag=tag, timeout_secs=timeout_secs)

    #: Whether :meth:`exchange` can move data between processes (a one-process job
    #: has no one to exchange with, so it can, trivially).
    supports_exchange = False

    def exchange(self, sends: dict[int, list], receives: dict[int, Any], *, tag: str,
                 timeout_secs: float) -> dict[int, list]:
        """Point-to-point transfers of byte buffers (all processes, even with nothing).

        Every process calls it at the same point, so it keeps the collectives matched:
        each sends ``sends[p]`` (buffers: bytes or contiguous numpy arrays) to process
        ``p`` and receives messages from process ``q``, in the order ``q`` sent them:
        ``receives[q]`` is a list (bulk data, received at full speed) of each one's
        byte size or of uint8 arrays to receive it into (reused buffers: fresh pages
        cost more than the transfer on some hosts), or just how many there are (an
        int: small messages, sized on arrival).
        Bulk data goes straight between the two processes (the local tier's peer
        copies and restores), never through the coordinator.

        Returns:
            {q: [uint8 numpy arrays, in q's order]}.

        Raises:
            CoordinationTimeoutError: a transfer did not finish within ``timeout_secs``.
            CheckpointError: this communicator carries no point-to-point transfers.
        """
        if self.process_index in sends or self.process_index in receives:
            raise ValueError(f"{tag}: a process does not exchange with itself")
        return self._run(
            lambda seq, deadline: self._exchange(sends, receives, tag, deadline, seq),
            tag, timeout_secs)

    def _exchange(self, sends, receives, tag, deadline, sequence) -> dict[int, list]:
        """See :meth:`exchange`; called with the lock held."""
        if not any(sends.values()) and not any(receives.values()):
            return {q: [] for q in receives}
        raise CheckpointError(
            f"{tag}: {type(self).__name__} has no point-to-point transfers; the local "
            "tier needs the MPI communicator (start the job under mpiexec and call "
            "launch.initialize())"
        )

    def _run(self, collective, tag: str, timeout_secs: float):
        """Runs one collective: refuses if broken, numbers it, breaks on failure."""
        deadline = _Deadline(timeout_secs)
        with self._lock:
            self._raise_if_broken(tag)
            sequence = self._sequence
            self._sequence += 1
            try:
                return collective(sequence, deadline)
            except Exception as error:  # a collective cut short leaves the job out of step
                self._break(f"{tag} failed on process {self.process_index}: {_short(error)}")
                raise

    def _raise_if_broken(self, tag: str) -> None:
        """Raises the "must restart" error if this instance or a peer broke."""
        if self._broken is None:
            peer = self._received_abort()
            if peer is not None:
                sender, reason = peer
                self._broken = f"process {sender} stopped: {reason}"
        if self._broken is not None:
            raise CoordinationError(
                f"Cannot run {tag}: checkpoint coordination stopped after an earlier "
                f"failure ({self._broken}); {_RESTART}"
            )

    def _break(self, reason: str) -> None:
        """Marks this instance broken and tells the peers (best effort, never blocks)."""
        if self._broken is not None:
            return
        self._broken = reason
        try:
            self._send_abort(reason.encode(errors="replace")[:4096])
        except Exception:  # noqa: BLE001 (the peers then time out instead)
            pass

    def _peer_abort_error(self, tag: str) -> CoordinationError | None:
        """The error to raise mid-collective if a peer has broken, else None."""
        peer = self._received_abort()
        if peer is None:
            return None
        sender, reason = peer
        return CoordinationError(
            f"Process {sender} gave up on the job's checkpoint coordination while this "
            f"process was in {tag} ({reason}); {_RESTART}"
        )


    @abc.abstractmethod
    def _gather(self, payload: bytes, tag: str, deadline: _Deadline,
                sequence: int) -> list[bytes] | None:
        """See :meth:`gather`; called with the lock held."""

    @abc.abstractmethod
    def _broadcast(self, payload: bytes | None, tag: str, deadline: _Deadline,
                   sequence: int) -> bytes:
        """See :meth:`broadcast`; ``payload`` is None exactly off the coordinator."""

    def _send_abort(self, reason: bytes) -> None:
        """Tells every peer that this process broke (must not block)."""
        del reason  # a single process has no peers

    def _received_abort(self) -> tuple[int, str] | None:
        """(sender, reason) of a peer's abort message, if one arrived."""
        return None


class LocalCommunicator(Communicator):
    """The single-process job: every collective returns at once."""

    supports_exchange = True

    def __init__(self):
        super().__init__(process_index=0, process_count=1)

    def _gather(self, payload, tag, deadline, sequence):
        return [payload]

    def _broadcast(self, payload, tag, deadline, sequence):
        return payload


def _as_bytes(buffer):
    """A flat uint8 view of ``buffer`` (bytes, or a contiguous numpy array of any dtype)."""
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        return np.frombuffer(buffer, np.uint8)
    return np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)


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

    Messages travel on a communicator of our own (never the user's), so they never
    match the user's. Point-to-point sends with ``Iprobe`` polling (rather than
    ``Igather``) let the coordinator name the processes that did not send, and keep
    every wait bounded. Messages are raw byte buffers, never pickled objects. Tag 0
    carries abort messages; collectives cycle through the other tags.

    mpi4py initialises MPI with thread level ``MULTIPLE`` by default; keep it so. Async
    saves run these collectives on a background thread while the main thread may be in
    the user's MPI calls, which lower thread levels forbid.

    Args:
        comm: an mpi4py communicator; its ranks are the process indices (default
            ``COMM_WORLD``).
        duplicate: ``Dup()`` it first (collective over ``comm``, and unbounded: every
            process must construct the instance). False takes ``comm`` as already
            private, as the one ``launch.initialize()`` makes while every process is
            known to be there (see `default_communicator`).
    """

    _ABORT_TAG = 0
    supports_exchange = True

    def __init__(self, comm=None, *, duplicate: bool = True):
        from mpi4py import MPI

        self._mpi = MPI
        comm = MPI.COMM_WORLD if comm is None else comm
        self._comm = comm.Dup() if duplicate else comm
        super().__init__(self._comm.Get_rank(), self._comm.Get_size())
        tag_upper_bound = self._comm.Get_attr(MPI.TAG_UB) or 32767
        self._tag_count = min(tag_upper_bound, 1 << 20) - 1
        self._abort_sends: list = []  # kept alive until they complete

    def _tag(self, sequence: int) -> int:
        return 1 + sequence % self._tag_count

    def _gather(self, payload, tag, deadline, sequence):
        byte = self._mpi.BYTE
        mpi_tag = self._tag(sequence)
        if not self.is_coordinator:
            request = self._comm.Isend([_frame(sequence, payload), byte], dest=0, tag=mpi_tag)
            self._wait_sent({0: request}, tag, deadline)
            return None
        received = {0: payload}
        receives = {}  # rank -> (request, buffer) once its message has been probed

        def step():
            if (error := self._peer_abort_error(tag)) is not None:
                raise error
            for rank in range(1, self.process_count):
                if rank in received:
                    continue
                if receives.get(rank) is None:
                    receives[rank] = self._probe_and_receive(rank, mpi_tag)
                if receives[rank] is not None and receives[rank][0].Test():
                    received[rank] = _unframe(bytes(receives.pop(rank)[1]), sequence, rank, tag)
            return [rank for rank in range(self.process_count) if rank not in received]

        try:
            _poll(step, deadline, lambda missing: _timeout_error(deadline, tag, missing))
        finally:
            for entry in receives.values():
                if entry is not None and not entry[0].Test():
                    entry[0].Cancel()
        return [received[rank] for rank in range(self.process_count)]

    def _exchange(self, sends, receives, tag, deadline, sequence):
        byte = self._mpi.BYTE
        mpi_tag = self._tag(sequence)
        requests = [self._comm.Isend([_as_bytes(buffer), byte], dest=p, tag=mpi_tag)
                    for p, buffers in sends.items() for buffer in buffers]
        posted: dict[int, list] = {q: [] for q in receives}
        for q, sizes in receives.items():
            if not isinstance(sizes, int):  # known sizes: every receive posted now
                for size in sizes:
                    buffer = size if isinstance(size, np.ndarray) else np.empty(size, np.uint8)
                    posted[q].append(buffer)
                    requests.append(self._comm.Irecv([buffer, byte], source=q, tag=mpi_tag))
        probed = {q: n for q, n in receives.items() if isinstance(n, int)}

        def probe():
            # Matched probes (Improbe) take q's messages one at a time, in q's send
            # order (MPI never lets two messages of one sender and tag overtake).
            if (error := self._peer_abort_error(tag)) is not None:
                raise error
            for q, count in probed.items():
                while len(posted[q]) < count:
                    status = self._mpi.Status()
                    message = self._comm.Improbe(source=q, tag=mpi_tag, status=status)
                    if message is None:
                        break
                    buffer = np.empty(status.Get_count(byte), np.uint8)
                    posted[q].append(buffer)
                    requests.append(message.Irecv([buffer, byte]))
            return [q for q, count in probed.items() if len(posted[q]) < count]

        _poll(probe, deadline, lambda missing: _timeout_error(deadline, tag, missing))
        self._wait_all(requests, tag, deadline, sorted({*sends, *receives}))
        return posted

    def _wait_all(self, requests: list, tag: str, deadline: _Deadline, peers: list) -> None:
        """Waits for ``requests`` in MPI's own blocking wait, still bounded.

        A blocking ``Waitall`` drives MPI's progress engine in C, at the transport's
        speed (2.5-3 GB/s between processes here); polling ``Test`` from Python moves
        a large message a slice per call (30-200 MB/s). It runs on a helper thread
        (MPI is initialised ``MULTIPLE``) while this one watches the deadline and the
        peers' aborts; on a timeout the communicator breaks, so the helper's stuck
        wait is never matched with anything else.
        """
        done = threading.Event()
        failure: list[BaseException] = []

        def wait():
            try:
                self._mpi.Request.Waitall(requests)
            except BaseException as error:  # noqa: BLE001 (raised by the caller's thread)
                failure.append(error)
            finally:
                done.set()

        threading.Thread(target=wait, name="dcheckpoint-exchange", daemon=True).start()
        while not done.wait(min(0.05, max(deadline.remaining_secs(), 0.001))):
            if (error := self._peer_abort_error(tag)) is not None:
                raise error
            if deadline.expired():
                raise _timeout_error(deadline, tag, peers)
        if failure:
            raise CoordinationError(f"{tag} failed in MPI: {failure[0]}")

    def _wait_sent(self, sends: dict, tag: str, deadline: _Deadline) -> None:
        def step():
            if (error := self._peer_abort_error(tag)) is not None:
                raise error
            return [rank for rank, request in sends.items() if not request.Test()]

        _poll(step, deadline,
              lambda missing: _timeout_error(deadline, tag, missing, sending=True))

    def _probe_and_receive(self, rank: int, mpi_tag: int):
        """Posts the receive of ``rank``'s message if it has arrived, sized to fit it."""
        status = self._mpi.Status()
        if not self._comm.Iprobe(source=rank, tag=mpi_tag, status=status):
            return None
        buffer = bytearray(status.Get_count(self._mpi.BYTE))
        request = self._comm.Irecv([buffer, self._mpi.BYTE], source=rank, tag=mpi_tag)
        return request, buffer

    def _broadcast(self, payload, tag, deadline, sequence):
        mpi_tag = self._tag(sequence)
        if self.is_coordinator:
            message = _frame(sequence, payload)
            sends = {
                rank: self._comm.Isend([message, self._mpi.BYTE], dest=rank, tag=mpi_tag)
                for rank in range(1, self.process_count)
            }
            self._wait_sent(sends, tag, deadline)
            return payload
        slot = [None]

        def step():
            if (error := self._peer_abort_error(tag)) is not None:
                raise error
            if slot[0] is None:
                slot[0] = self._probe_and_receive(0, mpi_tag)
            return [] if slot[0] is not None and slot[0][0].Test() else [0]

        _poll(step, deadline, lambda missing: _timeout_error(deadline, tag, missing))
        return _unframe(bytes(slot[0][1]), sequence, 0, tag)

    def _send_abort(self, reason):
        message = _frame(0, reason, _ABORT_MAGIC)
        for rank in range(self.process_count):
            if rank != self.process_index:
                self._abort_sends.append(self._comm.Isend(
                    [message, self._mpi.BYTE], dest=rank, tag=self._ABORT_TAG))

    def _received_abort(self):
        status = self._mpi.Status()
        if not self._comm.Iprobe(source=self._mpi.ANY_SOURCE, tag=self._ABORT_TAG,
                                 status=status):
            return None
        buffer = bytearray(status.Get_count(self._mpi.BYTE))
        self._comm.Recv([buffer, self._mpi.BYTE], source=status.Get_source(),
                        tag=self._ABORT_TAG)
        return status.Get_source(), bytes(buffer[_FRAME.size:]).decode(errors="replace")


class JaxDistributedCommunicator(Communicator):
    """Collectives over the key-value store of JAX's coordination service.

    For jobs started with ``jax.distributed.initialize`` but no MPI. Keys are namespaced
    per instance and numbered per collective, so instances and calls never collide. The
    coordinator deletes gathered keys once read, and broadcast keys at the next gather
    (by then every process has moved past the broadcast). A process that breaks sets
    ``<namespace>/abort/<index>``, which every wait checks a few times a second.

    Raises:
        RuntimeError: ``jax.distributed`` is not initialised in this process.
    """

    _instance_numbers = itertools.count()
    _ABORT_POLL_SECS = 0.25

    def __init__(self):
        from launch._bootstrap import jax_distributed_state  # why it is private: there

        state = jax_distributed_state()
        if state is None:
            raise RuntimeError(
                "JaxDistributedCommunicator needs jax.distributed to be initialised; call "
                "launch.initialize() or jax.distributed.initialize() first"
            )
        self._client = state.client
        super().__init__(state.process_id, state.num_processes)
        self._namespace = f"dcheckpoint/comm/{next(self._instance_numbers)}"
        self._stale_keys: list[str] = []

    def _gather(self, payload, tag, deadline, sequence):
        prefix = f"{self._namespace}/{sequence}"
        if not self.is_coordinator:
            self._client.key_value_set_bytes(f"{prefix}/{self.process_index}",
                                             _frame(sequence, payload))
            return None
        received = [payload]
        for rank in range(1, self.process_count):
            try:
                message = self._get(f"{prefix}/{rank}", tag, deadline, [rank])
            except CoordinationTimeoutError:
                # Name every sender still missing, not just the first one we waited on.
                present = {key for key, _ in self._client.key_value_dir_get_bytes(prefix + "/")}
                missing = [r for r in range(rank, self.process_count)
                           if f"{prefix}/{r}" not in present]  # fmt: skip
                raise _timeout_error(deadline, tag, missing) from None
            received.append(_unframe(message, sequence, rank, tag))
        for key in [*(f"{prefix}/{r}" for r in range(1, self.process_count)), *self._stale_keys]:
            self._client.key_value_delete(key)
        self._stale_keys.clear()
        return received

    def _broadcast(self, payload, tag, deadline, sequence):
        key = f"{self._namespace}/{sequence}/broadcast"
        if self.is_coordinator:
            self._client.key_value_set_bytes(key, _frame(sequence, payload))
            self._stale_keys.append(key)
            return payload
        return _unframe(self._get(key, tag, deadline, [0]), sequence, 0, tag)

    def _get(self, key: str, tag: str, deadline: _Deadline, sender: list[int]) -> bytes:
        """Waits for ``key`` until the deadline, checking for peers' aborts meanwhile.

        Raises:
            CoordinationTimeoutError: the key did not appear in time.
            CoordinationError: a peer broke, or the coordination service failed.
        """
        while True:
            if (error := self._peer_abort_error(tag)) is not None:
                raise error
            wait_secs = min(deadline.remaining_secs(), self._ABORT_POLL_SECS)
            try:
                return self._client.blocking_key_value_get_bytes(
                    key, max(1, int(wait_secs * 1000)))
            except Exception as error:  # jaxlib raises its own runtime error type
                if "DEADLINE_EXCEEDED" not in str(error):
                    raise CoordinationError(
                        f"The coordination service failed while waiting for {tag} from "
                        f"processes {sender}: {error}"
                    ) from error
                if deadline.expired():
                    raise _timeout_error(deadline, tag, sender) from error

    def _send_abort(self, reason):
        self._client.key_value_set_bytes(
            f"{self._namespace}/abort/{self.process_index}", reason)

    def _received_abort(self):
        for key, value in self._client.key_value_dir_get_bytes(f"{self._namespace}/abort/"):
            sender = int(key.rsplit("/", 1)[-1])
            if sender != self.process_index:
                return sender, bytes(value).decode(errors="replace")
        return None


# -- the one ordered path for every collective --------------------------------------

_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcheckpoint-collectives")
_ON_EXECUTOR = threading.local()


def _on_executor(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        _ON_EXECUTOR.active = True
        return fn()

    return run


# Async saves in flight by location (a storage's normalised ``path``), so a read of one
# waits for it (wait_for_save_of).
_SAVES_IN_FLIGHT: dict[str, Future] = {}
_SAVES_LOCK = threading.Lock()


def track_save(location: str, future: Future) -> None:
    """Records ``future`` as this process's save of ``location`` until it is done."""
    key = location
    with _SAVES_LOCK:
        _SAVES_IN_FLIGHT[key] = future

    def done(_):
        with _SAVES_LOCK:
            if _SAVES_IN_FLIGHT.get(key) is future:
                del _SAVES_IN_FLIGHT[key]

    future.add_done_callback(done)


def wait_for_save_of(location: str) -> Future | None:
    """Waits for this process's async save of ``location``, if one is in flight, and
    returns it (done). Its error stays with its saver too (``sync()`` raises it). Never
    on the collectives thread, where that save itself runs."""
    if getattr(_ON_EXECUTOR, "active", False):
        return None
    with _SAVES_LOCK:
        future = _SAVES_IN_FLIGHT.get(location)
    if future is not None:
        wait([future])
    return future


def submit(fn: Callable[[], Any]) -> Future:
    """Queues ``fn`` behind every collective this process issued before; see run_ordered."""
    return _EXECUTOR.submit(_on_executor(fn))


def run_ordered(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` (which makes collectives) in this process's one collective order.

    From any thread, ``fn`` runs on the collectives thread after everything submitted
    before it (an async save in flight, say), and this call waits for it. Called from
    that thread itself (a save inside an export), ``fn`` runs at once.
    """
    if getattr(_ON_EXECUTOR, "active", False):
        return fn()
    return submit(fn).result()


# -- agree: the coordinator decides, every process gets the same answer -------------

def error_kind(error: BaseException) -> str:
    """The name of the closest class of `dcheckpoint.errors` above ``error``'s type."""
    for cls in type(error).__mro__:
        if cls.__module__ == errors.__name__:
            return cls.__name__
    return CheckpointError.__name__


def _error_message(error: BaseException) -> str:
    if isinstance(error, CheckpointError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def agree(
    comm: Communicator,
    local_value: Any,
    decide: Callable[[list[Any]], Any],
    *,
    kind: str,
    tag: str,
    timeout_secs: float,
) -> Any:
    """One protocol step: the coordinator decides from every process's value.

    Every process sends ``local_value`` (JSON) to the coordinator, which checks that
    every process is making the same step (the same ``kind``, the same number of
    agreements so far), then calls ``decide(values)`` with the values in process
    order. Its JSON result, or its failure, goes back to every process.

    Args:
      comm: the communicator (every process passes its own instance of the same one).
      local_value: this process's JSON-serialisable contribution.
      decide: (coordinator only) returns the decided value or raises.
      kind: what the step is ("save identity", "manager start", ...); processes making
        different kinds of step fail with a CoordinationError that names them.
      tag: names the step in timeout messages.
      timeout_secs: bound on the gather and on the coordinator's broadcast; the other
        processes wait up to twice as long for the reply (so a hung peer is named).

    Returns:
      ``decide``'s result, on every process.
    Raises:
      CheckpointError: ``decide`` failed or the processes disagree: every process
        raises the same `dcheckpoint.errors` class (the closest one above the
        coordinator's error) with the same message. On the coordinator it is chained
        to the original error.
      CoordinationTimeoutError, CoordinationError: as :meth:`Communicator.gather`.
    """
    number = comm.agreements
    comm.agreements += 1
    mine = json.dumps({"kind": kind, "number": number, "value": local_value}).encode()
    gathered = comm.gather(mine, tag=tag, timeout_secs=timeout_secs)
    original = None
    reply = None
    if comm.is_coordinator:
        try:
            reply = {"value": decide(_check_same_step(gathered, tag))}
        except Exception as error:  # every process raises it, below
            original = error
            reply = {"error": _error_message(error), "kind": error_kind(error)}
        reply = json.dumps(reply).encode()
    # The other processes wait twice as long for the reply as the coordinator waits
    # for them: when one process hangs, the coordinator's timeout, which names it,
    # must reach everybody (as its abort) before their own timeouts, which could only
    # name the coordinator.
    reply = comm.broadcast(reply, tag=tag, timeout_secs=timeout_secs * (
        1 if comm.is_coordinator else 2))
    try:
        document = json.loads(reply)
        if "error" in document:
            message = str(document["error"])
            error_type = getattr(errors, str(document.get("kind")), CheckpointError)
        else:
            outcome = document["value"]
    except (ValueError, TypeError, KeyError) as error:
        comm._break(f"undecodable reply to {tag}")
        raise CoordinationError(
            f"The coordinator's reply to {tag} could not be decoded ({error}): {_RESTART}"
        ) from error
    if "error" in document:
        if not (isinstance(error_type, type) and issubclass(error_type, CheckpointError)):
            error_type = CheckpointError
        raise error_type(message) from original
    return outcome


def _check_same_step(gathered: list[bytes], tag: str) -> list[Any]:
    """(coordinator) The values of an agree step, once every process is in the same one."""
    documents = [json.loads(payload) for payload in gathered]
    steps = [(d.get("kind"), d.get("number")) for d in documents]
    if len(set(steps)) > 1:
        by_step: dict[tuple, list[int]] = {}
        for process, step in enumerate(steps):
            by_step.setdefault(step, []).append(process)
        described = "; ".join(f"processes {procs} are in {k!r} (step #{n} of this job)"
                              for (k, n), procs in by_step.items())
        raise CoordinationError(
            f"The processes are not making the same checkpoint call for {tag}: "
            f"{described}. Every process must make the same checkpoint calls in the same "
            "order; nothing was written"
        )
    return [d.get("value") for d in documents]


_default: Communicator | None = None
_default_lock = threading.Lock()


def default_communicator() -> Communicator:
    """Returns this process's shared communicator, made on first use.

    Local for a single-process job; MPI when ``launch.initialize()`` joined the job
    over MPI (it made a private duplicate of ``COMM_WORLD`` then, while every process
    was there, with ranks equal to JAX process indices); otherwise the JAX coordination
    service. Making it is never collective, so a first checkpoint call made by one
    process alone times out like any other instead of waiting forever in an MPI
    ``Dup``/``Split`` (and never issues a collective on the user's communicator).
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = _make_default()
        return _default


def _make_default() -> Communicator:
    # From jax.distributed's state, not jax.process_count(): that starts JAX's backend,
    # itself a collective wait on every process's devices.
    from launch._bootstrap import jax_distributed_state

    state = jax_distributed_state()
    if state is None or state.num_processes == 1:
        return LocalCommunicator()
    from launch import private_mpi_comm

    comm = private_mpi_comm()
    if comm is not None and comm.Get_size() == state.num_processes:
        return MPICommunicator(comm, duplicate=False)
    return JaxDistributedCommunicator()
