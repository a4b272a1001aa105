"""Preemption: agree on one step at which every process saves, then exit cleanly.

A scheduler that preempts a job sends a notice first (SIGTERM on plain hosts, Slurm and
Kubernetes; the cluster's own channel on TPU/GPU clouds) and kills it a grace period
later. A notice reaches processes at different times, or only one of them, while a save
is collective: every process must save at the *same* step.

A SIGTERM handler only sets a flag. At each step boundary (:meth:`reached`) every
process hands its flag and step to a helper thread, which sends them to the
coordinator; the coordinator broadcasts "save" if any process has a flag (or an error if
the steps differ). One gather and one broadcast of a few bytes per step, *off the
training thread*: the answer to step k's exchange is what :meth:`reached` returns at
step k + 1, so every process saves at that same step, and the training thread only
collects a result that is normally ready (a blocking exchange cost 12 ms per step on
this 2-core VM under load; collecting it costs microseconds).

Under ``jax.distributed`` JAX's preemption sync manager is asked too, every step
(``multihost_utils.reached_preemption_sync_point``): it carries the notices only JAX
sees (TPU maintenance events). Its answer is one more flag in our exchange, not the
decision: its protocol (a notifier thread polling each second, a key-value notice, a
barrier, then max(step) + 1) depends on timing and says nothing when it misses, and it
cannot tell ranks that ask at different steps. Ours is deterministic: a notice at step
k is a save at step k + 2 on every process, or an error on every process. Our handler
replaces JAX's SIGTERM notifier while the watcher lives.

:meth:`reached` is collective: every process calls it once per step, with the same step
number, and every process gets the same answer.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
from concurrent.futures import Future

from ._comm import Communicator, JaxDistributedCommunicator, MPICommunicator
from .errors import CoordinationError

__all__ = ["PreemptionWatcher"]

logger = logging.getLogger("dcheckpoint")


def _jax_sync_manager_available() -> bool:
    """Whether JAX's preemption sync manager runs in this (multi-process) job.

    The public probe: ``reached_preemption_sync_point`` returns False without
    ``jax.distributed`` and raises RuntimeError when the service is disabled. Probing
    with step -1 is harmless: a real step is always higher.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return False
    try:
        multihost_utils.reached_preemption_sync_point(-1)
    except RuntimeError:
        return False
    return True


def _private_communicator(comm: Communicator) -> Communicator:
    """A communicator of the same kind whose messages never meet ``comm``'s (collective).

    The exchange runs on the training thread while an async save's collectives run on
    the save thread; on one communicator their sequence numbers would interleave
    differently on different processes.
    """
    if isinstance(comm, MPICommunicator):
        return MPICommunicator()
    if isinstance(comm, JaxDistributedCommunicator):
        return JaxDistributedCommunicator()
    return comm


class PreemptionWatcher:
    """Watches for a preemption notice and answers, per step, "save now" on every process.

    Args:
      comm: the job's communicator; construction is collective over it.
      timeout_secs: bound on each step's exchange.
      signals: signals taken as a notice; default ``(SIGTERM,)``.

    Raises:
      ValueError: called outside the main thread (Python delivers signals there only)
        without JAX's preemption service, the one other way a SIGTERM is seen.
    """

    def __init__(self, comm: Communicator, *, timeout_secs: float,
                 signals=(signal.SIGTERM,)):
        self._timeout_secs = timeout_secs
        self._notice = threading.Event()
        self._last: tuple[int, bool] | None = None
        self._previous: dict[int, object] = {}
        self._pending: Future | None = None  # the last step's exchange
        self._requests: queue.SimpleQueue | None = None
        self.uses_jax = _jax_sync_manager_available()  # asked as one more notice source
        self._comm = _private_communicator(comm)
        if threading.current_thread() is not threading.main_thread():
            if not self.uses_jax:
                raise ValueError(
                    "save_on_preemption installs a SIGTERM handler, which Python allows "
                    "only in the main thread; create the CheckpointManager there"
                )
            # JAX's own notifier keeps SIGTERM, and its sync point is a flag here.
            logger.warning("save_on_preemption outside the main thread: SIGTERM is "
                           "seen through JAX's preemption service only")
            signals = ()
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag (no logging: its locks are not safe here): the save runs at the
        # next step boundary, in the training thread, once every process agrees. A
        # second notice does not kill the job either.
        del signum, frame
        self._notice.set()

    @property
    def notice_received(self) -> bool:
        """Whether this process received a notice (a signal or :meth:`notify`)."""
        return self._notice.is_set()

    def notify(self) -> None:
        """Records a notice as if the signal arrived (for custom channels)."""
        self._notice.set()

    def reached(self, step: int) -> bool:
        """Whether every process is to save at ``step`` now (collective, once per step).

        The answer reflects the notices seen at the previous call, so a notice leads to
        a save at the second step boundary after it, on every process.
        Asking again for the same step returns the same answer without another exchange.

        Raises:
          CoordinationError: the processes passed different steps (at the next call).
          CoordinationTimeoutError: a process stopped calling for ``timeout_secs``.
        """
        step = int(step)
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self.uses_jax:
            from jax.experimental import multihost_utils

            # Called every step, as JAX's manager needs; True only at its sync step.
            if multihost_utils.reached_preemption_sync_point(step):
                self._notice.set()
        answer = self._agree(step)
        self._last = (step, answer)
        if answer:
            logger.warning("preemption notice: every process agreed to save at step %d%s",
                           step, " (notice received here)" if self.notice_received else "")
        return answer

    def _agree(self, step: int) -> bool:
        """Starts this step's exchange; returns the previous step's decision (all)."""
        if self._comm.process_count == 1:
            return self._notice.is_set()
        if self._requests is None:
            self._requests = queue.SimpleQueue()
            # A daemon: an interpreter exit never waits on it (close() does, when asked).
            threading.Thread(target=self._serve, daemon=True,
                             name="dcheckpoint-preemption").start()
        previous, self._pending = self._pending, Future()
        self._requests.put((self._pending, self._notice.is_set(), step))
        return False if previous is None else previous.result()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            future, flag, step = request
            try:
                future.set_result(self._exchange(flag, step))
            except Exception as e:  # noqa: BLE001 (raised in the training thread)
                future.set_exception(e)

    def _exchange(self, flag: bool, step: int) -> bool:
        """(all) send the flag and step; (coordinator) broadcast whether any flag is set,
        or that the steps differ (every process then raises)."""
        comm = self._comm
        mine = json.dumps([flag, step]).encode()
        reports = comm.gather(mine, tag="preemption notice", timeout_secs=self._timeout_secs)
        decision = None
        if comm.is_coordinator:
            reports = [json.loads(r) for r in reports]
            steps = sorted({s for _, s in reports})
            decision = {"error": steps} if len(steps) > 1 else {
                "save": any(f for f, _ in reports)}
            decision = json.dumps(decision).encode()
        decision = json.loads(comm.broadcast(decision, tag="preemption decision",
                                             timeout_secs=self._timeout_secs))
        if "error" in decision:
            raise CoordinationError(
                f"Processes asked whether to save for a preemption at different steps "
                f"{decision['error']}; every process must call save() (or "
                f"reached_preemption) once per step with the same step"
            )
        return decision["save"]

    def close(self) -> None:
        """Finishes the exchange in flight and puts the previous signal handlers back.

        Waiting matters: every process started that exchange, and MPI must not be
        finalised under a thread still in it.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result(timeout=self._timeout_secs)
            except Exception as e:  # noqa: BLE001 (closing: nothing left to decide)
                logger.warning("preemption exchange ended with %s: %s", type(e).__name__, e)
        if self._requests is not None:
            self._requests.put(None)
            self._requests = None
        for signum, handler in self._previous.items():
            try:
                # None: a handler set outside Python (JAX's notifier); the default it
                # replaced is the best we can give back.
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            except ValueError:  # a finalizer outside the main thread: leave it
                logger.warning("could not restore the handler of signal %d outside the "
                               "main thread", signum)
        self._previous.clear()
