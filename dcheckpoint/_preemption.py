"""Preemption: agree on one step at which every process saves, then exit cleanly.

A scheduler that preempts a job sends a notice first (SIGTERM on plain hosts, Slurm and
Kubernetes; the cluster's own channel on TPU/GPU clouds) and kills it a grace period
later. A notice reaches processes at different times, or only one of them, while a save
is collective: every process must save at the *same* step. Two ways to agree:

- **JAX's preemption sync manager**, when ``jax.distributed`` runs it (the default in
  multi-process jobs): ``jax.experimental.multihost_utils.reached_preemption_sync_point``
  turns a notice on any host (JAX's own SIGTERM notifier on CPU and GPU, the TPU
  maintenance events) into one sync step, max(step of every host) + 1, through the
  coordination service in the background. We install no handler then: ours would
  replace JAX's.
- **Our own**, everywhere else (one process, or ``jax_enable_preemption_service`` off):
  a SIGTERM handler only sets a flag; at each step boundary (:meth:`reached`) every
  process sends its flag and step to the coordinator, which broadcasts "save now" if
  any process has one (or an error if the steps differ). One gather and one broadcast
  of a few bytes per step: microseconds over MPI, about a millisecond over the
  coordination service.

Either way :meth:`reached` is collective: every process calls it once per step, with the
same step number, and every process gets the same answer.
"""

from __future__ import annotations

import json
import logging
import signal
import threading

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
      timeout_secs: bound on each step's exchange (own mode only).
      signals: signals taken as a notice in own mode; default ``(SIGTERM,)``.

    Raises:
      ValueError: own mode outside the main thread (Python delivers signals there only).
    """

    def __init__(self, comm: Communicator, *, timeout_secs: float,
                 signals=(signal.SIGTERM,)):
        self._timeout_secs = timeout_secs
        self._notice = threading.Event()
        self._last: tuple[int, bool] | None = None
        self._previous: dict[int, object] = {}
        self.uses_jax = _jax_sync_manager_available()
        self._comm = comm if self.uses_jax else _private_communicator(comm)
        if not self.uses_jax:
            if threading.current_thread() is not threading.main_thread():
                raise ValueError(
                    "save_on_preemption installs a SIGTERM handler, which Python allows "
                    "only in the main thread; create the CheckpointManager there"
                )
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
        """Whether this process received a notice (own mode)."""
        return self._notice.is_set()

    def notify(self) -> None:
        """Records a notice as if the signal arrived (own mode; for custom channels)."""
        self._notice.set()

    def reached(self, step: int) -> bool:
        """Whether every process is to save at ``step`` now (collective, once per step).

        Asking again for the same step returns the same answer without another exchange.
        """
        step = int(step)
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self.uses_jax:
            from jax.experimental import multihost_utils

            answer = bool(multihost_utils.reached_preemption_sync_point(step))
        else:
            answer = self._agree(step)
        self._last = (step, answer)
        if answer:
            logger.warning("preemption notice: every process agreed to save at step %d%s",
                           step, " (notice received here)" if self.notice_received else "")
        return answer

    def _agree(self, step: int) -> bool:
        """(all) send this process's flag and step; (coordinator) broadcast whether any
        flag is set, or that the steps differ (every process then raises)."""
        comm = self._comm
        if comm.process_count == 1:
            return self._notice.is_set()
        mine = json.dumps([self._notice.is_set(), step]).encode()
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
        """Puts the previous signal handlers back (own mode)."""
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler)
            except ValueError:  # a finalizer outside the main thread: leave it
                logger.warning("could not restore the handler of signal %d outside the "
                               "main thread", signum)
        self._previous.clear()
