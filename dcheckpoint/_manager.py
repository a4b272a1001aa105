"""CheckpointManager and checkpoints_iterator, as TensorFlow's ``tf.train`` ones.

A manager numbers the checkpoints of one directory, keeps the newest ``max_to_keep``
(plus one every ``keep_checkpoint_every_n_hours``), records them in the directory's
state file and deletes the rest. Only one manager should be active per directory;
evaluators follow a training job with :func:`checkpoints_iterator` instead.

Protocol of one save, with roles:
  1. (all processes) interval check; ``save_counter`` += 1; number the checkpoint.
  2. (all processes) ``checkpoint.write(prefix-N, on_commit=...)``: the engine writes
     and commits (in the background for async saves).
  3. (all processes, after the commit) record the new checkpoint in memory and take
     the checkpoints that fell out of the kept set off the list; (coordinator) write
     the state file (the new checkpoint, without those), then delete them. Writing
     the state first means the state file never names a deleted checkpoint, and a
     crash mid-deletion still leaves the new checkpoint findable.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import numbers
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import _engine, errors
from ._best import check_best_fn, metric_of
from ._comm import agree, default_communicator, error_kind, run_ordered
from ._local_tier import LocalRestore, LocalStepUnusable, LocalTier
from ._lock import DirectoryLock
from ._manager_extras import ManagerExtras, whole_number
from ._manager_extras import evaluate_counter as _evaluate
from ._options import CheckpointOptions
from ._preemption import PreemptionWatcher
from ._state_file import (
    CheckpointState,
    check_inside,
    delete_checkpoint,
    get_checkpoint_state,
    get_pending_deletion,
    is_committed,
    latest_checkpoint,
    remove_leftover_temporaries,
    write_checkpoint_state,
)
from ._status import CheckpointAssertionError
from ._storage import TMP_MARKER, open_storage
from ._user_metadata import check_user_metadata

if TYPE_CHECKING:
    from ._checkpoint import Checkpoint
from .errors import CheckpointError, CoordinationError, CorruptCheckpointError

__all__ = ["CheckpointManager", "checkpoints_iterator", "wait_for_new_checkpoint"]

logger = logging.getLogger(__name__)

# Writer locks this process holds: {directory: [DirectoryLock, number of managers]}.
# Managers of one process share their directory's lock (tests and notebooks make a new
# manager for a directory whose old one is still alive); another process is refused.
_HELD_LOCKS: dict[str, list] = {}
# Reentrant: a manager's finalizer (_unlock_directory) can run from the garbage collector
# in the middle of _lock_directory, on the same thread, while the guard is held.
_HELD_LOCKS_GUARD = threading.RLock()
# Unlocks a finalizer could not make at once: the garbage collector can also run it on
# another thread (one starting up, say the new lock's lease thread, which
# _lock_directory waits for while it holds the guard), where waiting for the guard
# would deadlock both. They are made by the guard's next holder.
_DEFERRED_UNLOCKS: list[str] = []
_GUARD_WAIT_SECS = 1.0  # the guard is held for a file create, never long


def _lock_directory(directory: str) -> DirectoryLock:
    with _HELD_LOCKS_GUARD:
        entry = _HELD_LOCKS.get(directory)
        if entry is None:
            entry = _HELD_LOCKS[directory] = [DirectoryLock(directory).acquire(), 0]
        entry[1] += 1
        _unlock_deferred()
        return entry[0]


def _unlock_directory(directory: str) -> None:
    if not _HELD_LOCKS_GUARD.acquire(timeout=_GUARD_WAIT_SECS):
        _DEFERRED_UNLOCKS.append(directory)  # atomic; see _DEFERRED_UNLOCKS
        return
    try:
        _DEFERRED_UNLOCKS.append(directory)
        _unlock_deferred()
    finally:
        _HELD_LOCKS_GUARD.release()


def _unlock_deferred() -> None:
    """Makes the unlocks waiting in _DEFERRED_UNLOCKS (the guard held)."""
    while _DEFERRED_UNLOCKS:
        directory = _DEFERRED_UNLOCKS.pop()
        entry = _HELD_LOCKS.get(directory)
        if entry is None:
            continue
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD_LOCKS[directory]
            entry[0].release()


def _now() -> float:
    """The wall clock (seconds since the epoch); one place for tests to replace."""
    return time.time()


def _state_from_json(state: dict) -> CheckpointState:
    """The CheckpointState the coordinator's start decided (see ``_start``)."""
    return CheckpointState(
        state["model_checkpoint_path"],
        tuple(state["all_model_checkpoint_paths"]),
        tuple(state["all_model_checkpoint_timestamps"]),
        state["last_preserved_timestamp"],
    )


def _check_checkpoint_name(name, what: str = "checkpoint_name") -> None:
    """Refuses a ``checkpoint_name`` that is not one plain path component.

    ``<directory>/<name>-<N>`` must stay inside the directory and be neither a crashed
    save's leftover (``.tmp-``, removed by the next manager) nor hidden.
    """
    if (not isinstance(name, str) or not name or name in (os.curdir, os.pardir)
            or any(c in name for c in ("/", "\\", "\0", os.sep))
            or name.startswith(".") or TMP_MARKER in name):
        raise ValueError(
            f"{what} must be one plain path component (no '/', '\\', leading "
            f"'.', '..' or {TMP_MARKER!r}), so checkpoints stay inside the directory; "
            f"got {name!r}"
        )


class CheckpointManager(ManagerExtras):
    """Keeps the newest checkpoints of one directory and deletes the others.

    As ``tf.train.CheckpointManager``, including across instantiations: a new manager
    reads the directory's state file and manages the checkpoints the last one left,
    dropping entries whose checkpoint is no longer committed on disk. In a multi-process
    job every process makes the same calls; only the coordinator writes the state file
    and deletes, once, after the new checkpoint is committed.

    Args:
      checkpoint: the :class:`~dcheckpoint.Checkpoint` to save and restore.
      directory: where checkpoints and the state file live (created if missing): a
        local path or an object store URL such as ``s3://bucket/run``.
      max_to_keep: how many checkpoints stay managed; None keeps all.
      keep_checkpoint_every_n_hours: keep, for good, one checkpoint per this many
        hours; those leave the managed list but stay on disk.
      checkpoint_name: checkpoints are ``<directory>/<checkpoint_name>-<number>``.
      step_counter: a Variable (or anything ``int()``-able) holding the training step;
        needed for ``checkpoint_interval``.
      checkpoint_interval: minimum number of steps between saves.
      init_fn: called by :meth:`restore_or_initialize` when there is nothing to restore.
      best_fn: keep the best instead of the newest: ``best_fn(metadata) -> number`` of
        each save's metadata dict (``save(metadata=...)`` plus ``"step"``). Retention
        keeps the ``max_to_keep`` best, plus always the latest (so a job can resume);
        ``keep_checkpoint_every_n_hours`` applies to the ones it drops. A new manager
        reads the metric back from each checkpoint's metadata.
      best_mode: ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (loss).
      save_on_preemption: on a preemption notice (SIGTERM, or JAX's preemption sync
        manager on clusters), ``save()`` saves at the step every process agrees on,
        waits for the commit and exits the program with ``SystemExit(0)``. See
        :meth:`reached_preemption`.
      local_directory: a node-local directory (tmpfs, local NVMe) of this process for
        the local tier (docs/LOCAL_TIER.md): each process's own shards plus a copy of
        one peer's, saved asynchronously by ``save()`` every ``local_every`` steps
        (of ``step_counter``), whatever ``checkpoint_interval`` says.
        ``restore_or_initialize`` restores from it when it holds a complete step at
        least as new as the latest persistent checkpoint. It belongs to the host: a
        restarted job may give it to any rank.
      local_every: local saves at steps that are multiples of it (default 1).
      local_max_to_keep: committed local steps kept in each local directory.
      local_failure_domain: what this process fails with (default: its host name;
        e.g. a rack): each peer copy goes to another domain when there is one.

    Raises:
      ValueError: ``max_to_keep`` is not positive, ``checkpoint_interval`` is given
        without ``step_counter``, or ``best_fn``/``best_mode`` are malformed.
      TypeError: ``max_to_keep`` is not an int or None (a bool or float).
    """

    _NUMBER_ARGUMENT = "checkpoint_number"  # what a refused number is called in the error

    def __init__(
        self,
        checkpoint: Checkpoint,
        directory: str | os.PathLike,
        max_to_keep: int | None,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        step_counter: Any = None,
        checkpoint_interval: int | None = None,
        init_fn: Callable[[], Any] | None = None,
        *,
        best_fn: Callable[[dict], float] | None = None,
        best_mode: str = "max",
        save_on_preemption: bool = False,
        local_directory: str | os.PathLike | None = None,
        local_every: int | None = None,
        local_max_to_keep: int = 2,
        local_failure_domain: str | None = None,
    ) -> None:
        max_to_keep = _check_max_to_keep(max_to_keep)
        if local_every is not None and (isinstance(local_every, bool) or not isinstance(
                local_every, numbers.Integral) or local_every < 1):
            raise ValueError(f"local_every must be a positive int or None, got {local_every!r}")
        if local_every is not None and local_directory is None:
            raise ValueError("local_every needs a local_directory")
        if local_directory is not None and step_counter is None and not self._names_steps:
            raise ValueError("a local tier (local_directory) needs a step_counter: local "
                             "steps are numbered by training step")
        check_best_fn(best_fn, best_mode)
        if checkpoint_interval is not None and step_counter is None:
            raise ValueError(
                "`step_counter` should be passed if `checkpoint_interval` is not None."
            )
        _check_checkpoint_name(checkpoint_name)
        self._checkpoint = checkpoint
        self._directory = os.fspath(directory)
        self._max_to_keep = max_to_keep
        self._keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self._checkpoint_name = checkpoint_name
        self._prefix = os.path.join(self._directory, checkpoint_name)
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._init_fn = init_fn
        self._last_checkpoint_step = None
        self._comm = default_communicator()
        # on_commit runs in the engine's background thread for async saves.
        self._lock = threading.Lock()
        self._writer_lock = None
        self._release_lock = lambda: None
        self._best_fn, self._best_mode = best_fn, best_mode
        self._metrics: dict[str, float | None] = {}  # best_fn's value per path
        self._steps_by_path: dict[str, int | None] = {}  # saved "step"s read back
        self._save_calls = 0
        self._local_every = int(local_every or 1)
        self._last_local_step = None
        self.restored_from: str | None = None  # where the last restore read from
        self._start()
        self._local = None if local_directory is None else LocalTier(
            local_directory, max_to_keep=local_max_to_keep, comm=self._comm,
            failure_domain=local_failure_domain, run=open_storage(self._directory).path)
        # After the start collective, so every process builds the watcher at one point.
        self._preemption = (
            PreemptionWatcher(self._comm, timeout_secs=CheckpointOptions().timeout_secs)
            if save_on_preemption else None
        )
        if self._preemption is not None:
            # A dropped manager gives SIGTERM back; otherwise the signal would only set
            # a flag nobody reads any more.
            weakref.finalize(self, self._preemption.close)

    def _start(self) -> None:
        """Locks and cleans the directory and decides the managed list (coordinator),
        then hands that list, or the coordinator's failure, to every process (all).

        The lock comes first: without it, cleaning would delete the staging directory
        of another job that is saving into the same directory right now. One process
        decides and the others take its answer, because each deciding for itself lets
        clock skew or a stale network-filesystem view give processes different lists;
        a failure is sent too, so every process raises the same error at once instead
        of timing out. It is one `_comm.agree` step, in the job's order of collectives
        (after any async save still in flight).
        """
        def decide(identities: list) -> dict:
            if any(identity != identities[0] for identity in identities):
                raise CoordinationError(
                    f"The processes start CheckpointManagers of different directories or "
                    f"checkpoint names (in process order: {identities}); every process "
                    "must make the same checkpoint calls in the same order"
                )
            try:
                self._open_directory()
                return dataclasses.asdict(
                    self._recover(get_checkpoint_state(self._directory)))
            except Exception as e:
                self._release_lock()
                # Same class and message on every process (see _comm.agree).
                raise getattr(errors, error_kind(e))(
                    f"The coordinator could not start a CheckpointManager in "
                    f"{self._directory!r}: {type(e).__name__}: {e}"
                ) from e

        identity = {"directory": open_storage(self._directory).path,
                    "checkpoint_name": self._checkpoint_name}
        try:
            decided = _state_from_json(run_ordered(lambda: agree(
                self._comm, identity, decide, kind="manager start",
                tag=f"CheckpointManager({self._directory!r}) start",
                timeout_secs=CheckpointOptions().timeout_secs,
            )))
        except BaseException:
            self._release_lock()  # a failed broadcast after the coordinator locked
            raise
        self._latest_checkpoint = decided.model_checkpoint_path
        self._last_preserved_timestamp = decided.last_preserved_timestamp
        self._maybe_delete = collections.OrderedDict(
            zip(decided.all_model_checkpoint_paths, decided.all_model_checkpoint_timestamps,
                strict=True)
        )

    def _open_directory(self) -> None:
        """Creates and locks the directory, then removes crashed saves (coordinator)."""
        storage = open_storage(self._directory)
        storage.make_dirs()
        if storage.renames_atomically:  # a local filesystem: O_EXCL files work
            key = os.path.realpath(self._directory)
            self._writer_lock = _lock_directory(key)
            self._release_lock = weakref.finalize(self, _unlock_directory, key)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Removes what crashed saves left (coordinator); subclasses remove more.

        That includes checkpoints the last manager took off the list and recorded as
        pending deletion, but was killed before deleting (never one still managed).
        """
        for path in remove_leftover_temporaries(self._directory, self._checkpoint_name):
            logger.info("removed leftover temporary %s", path)
        state = get_checkpoint_state(self._directory)
        kept = set(state.all_model_checkpoint_paths) | {state.model_checkpoint_path} \
            if state else set()
        for path in get_pending_deletion(self._directory):
            if path not in kept and not self._leads_outside(path):
                self._delete(path)

    def _recover(self, state: CheckpointState | None) -> CheckpointState:
        """The managed list and clocks taken over from the last manager (TF's rules)."""
        current_clock = _now()
        if state is None:
            # Slightly in the past, so a manager re-created at once still preserves.
            return CheckpointState(None, last_preserved_timestamp=current_clock - 1.0)
        last_preserved = state.last_preserved_timestamp
        if current_clock < last_preserved:
            # The clock went backwards: never let that delete old checkpoints early.
            logger.warning("time went backwards since the last manager of %s", self._directory)
            last_preserved = current_clock
        timestamps = state.all_model_checkpoint_timestamps or (
            [last_preserved] * len(state.all_model_checkpoint_paths)
        )
        managed = {}
        for path, timestamp in zip(state.all_model_checkpoint_paths, timestamps, strict=True):
            if self._leads_outside(path):
                continue
            if not is_committed(path):
                logger.info("dropping %s from the managed list: not on disk", path)
                continue
            timestamp = min(timestamp, current_clock)
            if timestamp > last_preserved:
                managed[path] = timestamp
        latest = state.model_checkpoint_path
        if self._leads_outside(latest) or not is_committed(latest):
            latest = next(reversed(managed), None)
        return CheckpointState(latest, tuple(managed), tuple(managed.values()), last_preserved)

    def _leads_outside(self, path: str) -> bool:
        """Whether a state-file entry is a link out of the directory (then unmanaged:
        never restored from, never deleted)."""
        try:
            check_inside(self._directory, path)
        except CorruptCheckpointError as e:
            logger.warning("dropping %s from the managed list: %s", path, e)
            return True
        return False

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint(self) -> Checkpoint:
        return self._checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        return self._checkpoint_interval

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint's path, or None (no checkpoint yet)."""
        with self._lock:
            return self._latest_checkpoint

    @property
    def checkpoints(self) -> list[str]:
        """The managed checkpoints' paths, oldest first."""
        with self._lock:
            return list(self._maybe_delete)

    @property
    def local_steps(self) -> list[int]:
        """The committed local-tier steps in this process's local directory (its own
        view; a restore agrees with the other processes on what is complete)."""
        return [] if self._local is None else self._local.steps

    def sync(self) -> None:
        """Waits for the saves in flight (both tiers), raising the first error."""
        try:
            self._checkpoint.sync()
        finally:
            if self._local is not None:
                self._local.sync()

    def restore_or_initialize(self, *, strict: bool = False) -> str | None:
        """Restores the latest checkpoint, or calls ``init_fn`` when there is none.

        With a local tier, the newest step complete there (every process's own and
        peer copies together) at least as new as the latest persistent checkpoint
        comes from it, fetching from peers only what this process lacks; else the
        latest persistent checkpoint, with a log line saying why (every process
        alike). :attr:`restored_from` says which.

        Args:
          strict: raise unless the restore matched exactly (``assert_consumed``): every
            object got a value and every saved value found its object. TF's default,
            False, is lenient: a renamed layer silently keeps its fresh init (only a
            warning when the status is garbage collected says so). The error comes after
            the matched values were assigned; it stops the job before it trains.

        Returns:
          The restored checkpoint's path (for a local step: this process's local
          directory of it), or None when it initialised instead.

        Raises:
          CheckpointAssertionError: with ``strict``, naming the objects that got no value
            and the saved values that found no object.
        """
        if self._local is not None:
            opened = self._restore_local(None, lambda source: _check_strict(
                self._checkpoint._dc_read_from(source), strict))
            if opened is not None:
                if self._checkpoint_interval is not None:
                    self._last_checkpoint_step = _evaluate(self._step_counter)
                return opened.where
        latest = self.latest_checkpoint
        if latest is not None:
            self.restored_from = latest
            _check_strict(self._checkpoint.restore(latest), strict)
            if self._checkpoint_interval is not None:
                self._last_checkpoint_step = _evaluate(self._step_counter)
            return latest
        if self._init_fn is not None:
            self._init_fn()
            logger.info("no checkpoint in %s: initialised with init_fn", self._directory)
        return None

    _names_steps = False  # PytreeManager names checkpoints by step: no step_counter

    def _restore_local(self, step, restore) -> LocalRestore | None:
        """``restore(opened)`` of the newest complete local step (``step``: that one)
        at least as new as the latest persistent checkpoint; the opened step, or None
        when the local tier has none (all processes alike)."""
        self.sync()
        latest = self.latest_step()
        while True:
            started = time.perf_counter()
            opened = self._local.open(latest if step is None else None, step=step)
            if isinstance(opened, str):
                logger.warning("local tier of %s: nothing to restore (%s); using the "
                               "persistent tier (latest step %s)", self._local.directory,
                               opened, latest)
                return None
            try:
                restore(opened)
            except LocalStepUnusable as e:  # its bad pieces are now excluded
                logger.warning("%s; looking for another source", e)
                continue
            self.restored_from = f"local step {opened.step}"
            self._last_local_step = opened.step
            logger.info("restored step %d from the local tier in %.3f s (persistent "
                        "latest: %s)", opened.step, time.perf_counter() - started, latest)
            return opened

    def _prepare_local(self, checkpoint_number, metadata, force: bool):
        """The local save of this ``save()`` call, planned and snapshotted, as a call
        that starts it; None when none is due (all processes alike)."""
        if self._local is None:
            return None
        step = _evaluate(self._step_counter if self._step_counter is not None
                         else checkpoint_number)
        if step == self._last_local_step or not (force or step % self._local_every == 0):
            return None
        arrays, graph = self._checkpoint._dc_flatten()
        start = self._local.prepare(step, arrays, object_graph=graph,
                                    user_metadata={"step": step, **(metadata or {})})

        def started() -> None:
            start()
            self._last_local_step = step

        return started

    def _next_number(self, checkpoint_number, check_interval) -> int | None:
        """Steps 1 of the protocol: the number to save under, or None to skip."""
        if self._checkpoint_interval is not None:
            current_step = _evaluate(self._step_counter)
            if self._last_checkpoint_step is not None:
                if current_step == self._last_checkpoint_step:
                    return None
                if check_interval and current_step < (
                    self._last_checkpoint_step + self._checkpoint_interval
                ):
                    return None
            self._last_checkpoint_step = current_step
        save_counter = self._checkpoint.save_counter
        save_counter.assign(_evaluate(save_counter) + 1)
        if checkpoint_number is None:
            checkpoint_number = _evaluate(save_counter)
        return _evaluate(checkpoint_number)

    def _checked(self, checkpoint_number, metadata) -> tuple[dict | None, int | None,
                                                             Exception | None]:
        """(the checked metadata, the checkpoint number as an int or None, None), or
        (None, None, the error): a refusal is raised later, where the other processes of
        the save learn of it (see save)."""
        try:
            if checkpoint_number is not None:
                checkpoint_number = whole_number(checkpoint_number, self._NUMBER_ARGUMENT)
            metadata = check_user_metadata(metadata)
            self._check_metric(checkpoint_number, metadata)
        except Exception as e:
            return None, None, e
        return metadata, checkpoint_number, None

    def _numbering(self) -> tuple:
        """What `_next_number` changes: the interval clock and the save counter."""
        return self._last_checkpoint_step, _evaluate(self._checkpoint.save_counter)

    def _take_back(self, numbering: tuple) -> None:
        """Undoes `_next_number` after a save that failed without committing: nothing
        was saved, on any process, so every process takes it back alike and keeps
        numbering saves the same way."""
        self._last_checkpoint_step = numbering[0]
        self._checkpoint.save_counter.assign(numbering[1])

    def save(self, checkpoint_number: Any = None, check_interval: bool = True,
             options: CheckpointOptions | None = None, *,
             metadata: dict | None = None) -> str | None:
        """Saves a checkpoint numbered as TF's manager does, then applies retention.

        Args:
          checkpoint_number: used as is in the name; default: the incremented
            ``checkpoint.save_counter``. An int >= 0, or an integral 0-d array or
            Variable; anything else (7.5, -1, True) raises TypeError/ValueError on
            every process and saves nothing.
          check_interval: with ``checkpoint_interval``, skip the save unless enough
            steps passed since the last one; False saves anyway (unless the step did
            not change at all).
          options: :class:`~dcheckpoint.CheckpointOptions`; async saves return at once
            and retention runs after the background commit.
          metadata: a small JSON dict stored in the checkpoint (metrics, config hash,
            ...), with ``"step"`` (the ``step_counter``'s value, else the checkpoint
            number) added unless given;
            ``read_metadata(path).user_metadata`` reads it back. Every process must
            pass the same dict (one is stored, and ``best_fn`` ranks by it): processes
            whose dicts differ all raise `CoordinationError` naming the keys, and
            nothing is written.

        Returns:
          The checkpoint's path, or None when the interval said not yet.

        Raises:
          ValueError: ``metadata`` is not JSON or too big, or ``best_fn`` returned no
            number; nothing was saved.
          SystemExit: with ``save_on_preemption``, after the preemption save committed.
        """
        metadata, checkpoint_number, refused = self._checked(checkpoint_number, metadata)
        preempted = self._check_preemption(checkpoint_number)  # collective: every call
        before = self._numbering()
        number = self._next_number(checkpoint_number, check_interval and not preempted)
        try:
            if refused is not None and number is None:
                raise refused  # nobody saves at this call: nothing to tell the others
            if refused is not None:
                self._checkpoint.sync()  # as the others do first: an earlier error wins
                _engine.save_failed_here(f"{self._prefix}-{number}", refused,
                                         options=options)
            # Snapshotted after numbering (the local step holds this call's
            # save_counter) and before the persistent save starts writing; started
            # after it, so the persistent save keeps its place in the collectives.
            local = self._prepare_local(checkpoint_number, metadata, force=not check_interval)
            path = None if number is None else self._write(number, options, metadata)
        except Exception:
            if number is None or not self._checkpoint._committed(f"{self._prefix}-{number}"):
                self._take_back(before)
            raise
        if local is not None:
            local()
        if preempted:
            self._exit_preempted(path)
        return path

    def _write(self, number: int, options, metadata=None) -> str:
        prefix = f"{self._prefix}-{number}"
        step = number if self._step_counter is None else _evaluate(self._step_counter)
        metadata = {"step": step, **(metadata or {})}
        if self._best_fn is not None:
            metric = metric_of(self._best_fn, metadata, where=prefix)
            with self._lock:
                self._metrics[prefix] = metric
        return self._checkpoint.write(prefix, options=options, on_commit=self._on_commit,
                                      metadata=metadata)

    def _on_commit(self, save_path: str) -> None:
        """Step 3 of the protocol (all processes; state file and deletions: coordinator)."""
        save_path = os.fspath(save_path)
        with self._lock:
            # An overwritten checkpoint moves to the end of the queue.
            self._maybe_delete.pop(save_path, None)
            self._maybe_delete[save_path] = _now()
            self._steps_by_path.pop(save_path, None)
            self._latest_checkpoint = save_path
            victims = self._sweep()
            try:
                if self._writer_lock is not None:
                    self._writer_lock.check()
                # The state without the victims goes first: a reader of the state file
                # never finds a checkpoint that is already gone.
                self._record_state(pending_deletion=victims)
                if self._comm.is_coordinator:
                    for path in victims:
                        self._delete(path)
            except OSError as e:
                raise CheckpointError(
                    f"Checkpoint {save_path!r} is committed and restorable, but updating "
                    f"the state file or deleting old checkpoints in {self._directory!r} "
                    f"failed: {e}"
                ) from e

    def _record_state(self, pending_deletion=()) -> None:
        if not self._comm.is_coordinator:
            return
        write_checkpoint_state(
            self._directory,
            CheckpointState(
                self._latest_checkpoint,
                tuple(self._maybe_delete),
                tuple(self._maybe_delete.values()),
                self._last_preserved_timestamp,
            ),
            pending_deletion=pending_deletion,
        )
        logger.debug("wrote the state file of %s", self._directory)

    def _sweep(self) -> list[str]:
        """Drops checkpoints beyond ``max_to_keep`` from the list; returns those to delete.

        Nothing is deleted here: the caller records the new state first.
        """
        if self._best_fn is not None:
            return self._sweep_best()
        victims = []
        if not self._max_to_keep:
            return victims
        hours = self._keep_checkpoint_every_n_hours
        while len(self._maybe_delete) > self._max_to_keep:
            path, timestamp = self._maybe_delete.popitem(last=False)
            # A preserved checkpoint leaves the list too, so the state file stays small.
            if hours and timestamp - hours * 3600.0 >= self._last_preserved_timestamp:
                self._last_preserved_timestamp = timestamp
                continue
            victims.append(path)
        return victims

    def _delete(self, path: str) -> None:
        """Deletes one checkpoint from disk (coordinator); subclasses delete more."""
        if delete_checkpoint(path):
            logger.info("deleted old checkpoint %s", path)


def _check_strict(status, strict: bool):
    """``status``, after ``assert_consumed`` when ``strict`` (its error said once)."""
    if strict:
        try:
            status.assert_consumed()
        except CheckpointAssertionError:
            status.expect_partial()  # said once, by this error
            raise
    return status


def _check_max_to_keep(max_to_keep):
    """TF's rule: a positive int, or None to keep all; a bool or float is refused."""
    if max_to_keep is None:
        return None
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, numbers.Integral):
        raise TypeError(
            f"max_to_keep must be a positive int or None (keep all), got {max_to_keep!r} "
            f"({type(max_to_keep).__name__})"
        )
    if max_to_keep <= 0:
        raise ValueError(
            f"max_to_keep must be positive or None (keep all), got {max_to_keep!r}"
        )
    return int(max_to_keep)


def wait_for_new_checkpoint(
    checkpoint_dir, last_checkpoint=None, seconds_to_sleep=1.0, timeout=None
) -> str | None:
    """Waits until the latest checkpoint of ``checkpoint_dir`` differs from ``last_checkpoint``.

    Returns:
      The new latest checkpoint's path, or None after ``timeout`` seconds.
    """
    return _wait_for_new(
        lambda: latest_checkpoint(checkpoint_dir), last_checkpoint, seconds_to_sleep, timeout
    )


def _wait_for_new(find_latest, last, seconds_to_sleep, timeout):
    stop_time = _now() + timeout if timeout is not None else None
    while True:
        latest = find_latest()
        if latest is not None and latest != last:
            return latest
        if stop_time is not None and _now() + seconds_to_sleep > stop_time:
            return None
        time.sleep(seconds_to_sleep)


def checkpoints_iterator(
    checkpoint_dir: str | os.PathLike, min_interval_secs: float = 0,
    timeout: float | None = None, timeout_fn: Callable[[], bool] | None = None, *,
    seconds_to_sleep: float = 1.0,
) -> Iterator[str]:
    """Yields each new latest checkpoint of ``checkpoint_dir`` (TF's semantics).

    For evaluators following a training job. Intermediate checkpoints written while
    the consumer was busy are skipped: only the latest one at each poll is yielded.

    Args:
      checkpoint_dir: the directory a manager writes into.
      min_interval_secs: minimum seconds between two yields.
      timeout: seconds to wait for a new checkpoint; None waits forever.
      timeout_fn: called when a wait times out; it returns True to end the iteration
        or False to keep waiting. Without it, a timeout ends the iteration.
      seconds_to_sleep: how often the state file is polled.

    Yields:
      Checkpoint paths, each committed when yielded.
    """
    return _iterate(
        lambda last: wait_for_new_checkpoint(checkpoint_dir, last, seconds_to_sleep, timeout),
        min_interval_secs,
        timeout_fn,
    )


def _iterate(wait_for_new, min_interval_secs, timeout_fn):
    path = None
    while True:
        new_path = wait_for_new(path)
        if new_path is None:
            if not timeout_fn:
                logger.info("timed out waiting for a checkpoint")
                return
            if timeout_fn():
                return
            continue
        start = _now()
        path = new_path
        yield path
        time_to_next = start + min_interval_secs - _now()
        if time_to_next > 0:
            time.sleep(time_to_next)
