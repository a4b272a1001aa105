"""A job of P simulated processes in one interpreter: one thread and one communicator each.

`ThreadJob(P)` makes P `ThreadCommunicator`s that exchange framed byte messages through
in-memory queues, with the same rules as the MPI and JAX communicators (sequence-checked
frames, bounded waits, abort messages that break every peer). The engine takes them like
any other communicator, so scripts/scale.py and the tests run the real protocol (the
identity step, manifests, the coverage check, the commit) for thousands of processes on
one machine, and count the bytes each collective really moves.

The job also measures the coordinator: ``decide_cpu_s`` is the coordinator thread's CPU
time between the end of each gather and the start of the broadcast that follows (the
decoding of every payload and the decision, which for a save's outcome includes the
commit; the engine's `LAST_SAVE_PHASES` has the commit's own share).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ._comm import Communicator, _Deadline, _frame, _timeout_error, _unframe

__all__ = ["ThreadJob", "ThreadCommunicator"]

_ABORT = object()  # queued to wake a waiting peer when some process breaks


class ThreadJob:
    """P communicators that talk through queues, and what they exchanged.

    Attributes:
      communicators: one per simulated process, index = process index.
      gathered_bytes: bytes the coordinator received in gathers (frames included).
      broadcast_bytes: bytes of the coordinator's broadcasts, counted once per receiver.
      decide_cpu_s: see the module docstring.
    """

    def __init__(self, process_count: int, *, running: int = 4):
        if process_count < 1:
            raise ValueError(f"a job needs at least one process, got {process_count}")
        self.process_count = process_count
        self._to_coordinator: queue.SimpleQueue = queue.SimpleQueue()
        self._to_process = [queue.SimpleQueue() for _ in range(process_count)]
        self._aborts: dict[int, bytes] = {}
        self._count_lock = threading.Lock()
        # At most ``running`` simulated processes run Python at once; the others wait
        # in a collective or for a slot. Thousands of threads all waiting for the GIL
        # would each wake every switch interval and spend the machine in the kernel.
        self._slots = threading.BoundedSemaphore(running)
        self.reset_counters()
        self.communicators = [ThreadCommunicator(self, i) for i in range(process_count)]

    def reset_counters(self) -> None:
        self.gathered_bytes = self.broadcast_bytes = 0
        self.decide_cpu_s = 0.0

    def run(self, fn: Callable[[ThreadCommunicator], Any], *,
            stack_bytes: int = 512 << 10) -> list[Any]:
        """Runs ``fn(comm)`` for every process at once, each on its own thread.

        Returns:
          Each process's result, or the exception it raised, in process order.
        """
        results: list[Any] = [None] * self.process_count

        def body(i: int) -> None:
            self._slots.acquire()
            try:
                results[i] = fn(self.communicators[i])
            except BaseException as e:  # noqa: BLE001 (handed back to the caller)
                results[i] = e
            finally:
                self._slots.release()

        previous = threading.stack_size(stack_bytes)  # thousands of threads: small stacks
        try:
            threads = [threading.Thread(target=body, args=(i,), daemon=True,
                                        name=f"simulated-process-{i}")
                       for i in range(self.process_count)]
            for t in threads:
                t.start()
        finally:
            threading.stack_size(previous)
        for t in threads:
            t.join()
        return results


class ThreadCommunicator(Communicator):
    """One simulated process's end of a `ThreadJob`."""

    def __init__(self, job: ThreadJob, process_index: int):
        super().__init__(process_index, job.process_count)
        self._job = job
        self._decide_started: float | None = None

    def _gather(self, payload, tag, deadline, sequence):
        job = self._job
        if not self.is_coordinator:
            job._to_coordinator.put((self.process_index, _frame(sequence, payload)))
            return None
        received: dict[int, bytes] = {0: payload}
        while len(received) < self.process_count:
            sender, message = self._next(job._to_coordinator, tag, deadline, lambda: [
                r for r in range(self.process_count) if r not in received])
            with job._count_lock:
                job.gathered_bytes += len(message)
            received[sender] = _unframe(message, sequence, sender, tag)
        self._decide_started = time.thread_time()
        return [received[r] for r in range(self.process_count)]

    def _broadcast(self, payload, tag, deadline, sequence):
        job = self._job
        if self.is_coordinator:
            if self._decide_started is not None:
                job.decide_cpu_s += time.thread_time() - self._decide_started
                self._decide_started = None
            message = _frame(sequence, payload)
            for rank in range(1, self.process_count):
                job._to_process[rank].put((0, message))
            job.broadcast_bytes += len(message) * (self.process_count - 1)
            return payload
        _, message = self._next(job._to_process[self.process_index], tag, deadline,
                                lambda: [0])
        return _unframe(message, sequence, 0, tag)

    def _next(self, inbox: queue.SimpleQueue, tag: str, deadline: _Deadline,
              missing: Callable[[], list[int]]) -> tuple[int, bytes]:
        """The next message of ``inbox``; raises on a peer's abort or at the deadline."""
        while True:
            if (error := self._peer_abort_error(tag)) is not None:
                raise error
            self._job._slots.release()  # waiting: let another process run meanwhile
            try:
                item = inbox.get(timeout=max(deadline.remaining_secs(), 1e-3))
            except queue.Empty:
                item = None
            finally:
                self._job._slots.acquire()
            if item is None:
                if deadline.expired():
                    raise _timeout_error(deadline, tag, missing()) from None
                continue
            if item is not _ABORT:
                return item

    def _send_abort(self, reason):
        job = self._job
        job._aborts.setdefault(self.process_index, reason)
        for rank in range(self.process_count):  # wake whoever waits
            if rank != self.process_index:
                (job._to_coordinator if rank == 0 else job._to_process[rank]).put(_ABORT)

    def _received_abort(self):
        for sender, reason in list(self._job._aborts.items()):
            if sender != self.process_index:
                return sender, reason.decode(errors="replace")
        return None
