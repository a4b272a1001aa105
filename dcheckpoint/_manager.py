"""CheckpointManager and checkpoints_iterator, as TensorFlow's ``tf.train`` ones.

A manager numbers the checkpoints of one directory, keeps the newest ``max_to_keep``
(plus one every ``keep_checkpoint_every_n_hours``), records them in the directory's
state file and deletes the rest. Only one manager should be active per directory;
evaluators follow a training job with :func:`checkpoints_iterator` instead.

Protocol of one save, with roles:
  1. (all processes) interval check; ``save_counter`` += 1; number the checkpoint.
  2. (all processes) ``checkpoint.write(prefix-N, on_commit=...)``: the engine writes
     and commits (in the background for async saves).
  3. (all processes, after the commit) record the new checkpoint in memory;
     (coordinator) write the state file, delete checkpoints that fell out of the
     kept set, write the state file again without them. Recording before deleting
     means a crash mid-deletion still leaves the new checkpoint findable.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
import weakref

from . import errors
from ._comm import agree, default_communicator, error_kind, run_ordered
from ._lock import DirectoryLock
from ._options import CheckpointOptions
from ._state_file import (
    CheckpointState,
    delete_checkpoint,
    get_checkpoint_state,
    is_committed,
    latest_checkpoint,
    remove_leftover_temporaries,
    write_checkpoint_state,
)
from ._storage import open_storage
from .errors import CheckpointError, CoordinationError

__all__ = ["CheckpointManager", "checkpoints_iterator", "wait_for_new_checkpoint"]

logger = logging.getLogger(__name__)

# Writer locks this process holds: {directory: [DirectoryLock, number of managers]}.
# Managers of one process share their directory's lock (tests and notebooks make a new
# manager for a directory whose old one is still alive); another process is refused.
_HELD_LOCKS: dict[str, list] = {}
# Reentrant: a manager's finalizer (_unlock_directory) can run from the garbage collector
# in the middle of _lock_directory, on the same thread, while the guard is held.
_HELD_LOCKS_GUARD = threading.RLock()


def _lock_directory(directory: str) -> DirectoryLock:
    with _HELD_LOCKS_GUARD:
        entry = _HELD_LOCKS.get(directory)
        if entry is None:
            entry = _HELD_LOCKS[directory] = [DirectoryLock(directory).acquire(), 0]
        entry[1] += 1
        return entry[0]


def _unlock_directory(directory: str) -> None:
    with _HELD_LOCKS_GUARD:
        entry = _HELD_LOCKS.get(directory)
        if entry is None:
            return
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


def _evaluate(counter) -> int:
    """The integer value of a step counter: a Variable, an array or a Python int."""
    value = counter.value if hasattr(counter, "value") else counter
    return int(value)


class CheckpointManager:
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

    Raises:
      ValueError: ``max_to_keep`` is not positive, or ``checkpoint_interval`` is given
        without ``step_counter``.
    """

    def __init__(
        self,
        checkpoint,
        directory,
        max_to_keep,
        keep_checkpoint_every_n_hours=None,
        checkpoint_name="ckpt",
        step_counter=None,
        checkpoint_interval=None,
        init_fn=None,
    ):
        if max_to_keep is not None and max_to_keep <= 0:
            raise ValueError(
                f"max_to_keep must be positive or None (keep all), got {max_to_keep!r}"
            )
        if checkpoint_interval is not None and step_counter is None:
            raise ValueError(
                "`step_counter` should be passed if `checkpoint_interval` is not None."
            )
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
        self._start()

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
        """Removes what crashed saves left (coordinator); subclasses remove more."""
        for path in remove_leftover_temporaries(self._directory, self._checkpoint_name):
            logger.info("removed leftover temporary %s", path)

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
            if not is_committed(path):
                logger.info("dropping %s from the managed list: not on disk", path)
                continue
            timestamp = min(timestamp, current_clock)
            if timestamp > last_preserved:
                managed[path] = timestamp
        latest = state.model_checkpoint_path
        if not is_committed(latest):
            latest = next(reversed(managed), None)
        return CheckpointState(latest, tuple(managed), tuple(managed.values()), last_preserved)

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint(self):
        return self._checkpoint

    @property
    def checkpoint_interval(self):
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

    def sync(self) -> None:
        """Waits for an async save in flight, raising its error if it failed."""
        self._checkpoint.sync()

    def restore_or_initialize(self) -> str | None:
        """Restores the latest checkpoint, or calls ``init_fn`` when there is none.

        Returns:
          The restored checkpoint's path, or None when it initialised instead.
        """
        latest = self.latest_checkpoint
        if latest is not None:
            self._checkpoint.restore(latest)
            if self._checkpoint_interval is not None:
                self._last_checkpoint_step = _evaluate(self._step_counter)
            return latest
        if self._init_fn is not None:
            self._init_fn()
            logger.info("no checkpoint in %s: initialised with init_fn", self._directory)
        return None

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

    def save(self, checkpoint_number=None, check_interval=True, options=None) -> str | None:
        """Saves a checkpoint numbered as TF's manager does, then applies retention.

        Args:
          checkpoint_number: used as is in the name; default: the incremented
            ``checkpoint.save_counter``. A Variable or int.
          check_interval: with ``checkpoint_interval``, skip the save unless enough
            steps passed since the last one; False saves anyway (unless the step did
            not change at all).
          options: :class:`~dcheckpoint.CheckpointOptions`; async saves return at once
            and retention runs after the background commit.

        Returns:
          The checkpoint's path, or None when the interval said not yet.
        """
        number = self._next_number(checkpoint_number, check_interval)
        if number is None:
            return None
        return self._write(number, options)

    def _write(self, number: int, options) -> str:
        prefix = f"{self._prefix}-{number}"
        return self._checkpoint.write(prefix, options=options, on_commit=self._on_commit)

    def _on_commit(self, save_path: str) -> None:
        """Step 3 of the protocol (all processes; state file and deletions: coordinator)."""
        save_path = os.fspath(save_path)
        with self._lock:
            # An overwritten checkpoint moves to the end of the queue.
            self._maybe_delete.pop(save_path, None)
            self._maybe_delete[save_path] = _now()
            self._latest_checkpoint = save_path
            try:
                if self._writer_lock is not None:
                    self._writer_lock.refresh()
                self._record_state()
                if self._sweep():
                    self._record_state()
            except OSError as e:
                raise CheckpointError(
                    f"Checkpoint {save_path!r} is committed and restorable, but updating "
                    f"the state file or deleting old checkpoints in {self._directory!r} "
                    f"failed: {e}"
                ) from e

    def _record_state(self) -> None:
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
        )
        logger.debug("wrote the state file of %s", self._directory)

    def _sweep(self) -> bool:
        """Drops checkpoints beyond ``max_to_keep``; returns whether any left the list."""
        if not self._max_to_keep or len(self._maybe_delete) <= self._max_to_keep:
            return False
        hours = self._keep_checkpoint_every_n_hours
        while len(self._maybe_delete) > self._max_to_keep:
            path, timestamp = self._maybe_delete.popitem(last=False)
            # A preserved checkpoint leaves the list too, so the state file stays small.
            if hours and timestamp - hours * 3600.0 >= self._last_preserved_timestamp:
                self._last_preserved_timestamp = timestamp
                continue
            if self._comm.is_coordinator:
                self._delete(path)
        return True

    def _delete(self, path: str) -> None:
        """Deletes one checkpoint from disk (coordinator); subclasses delete more."""
        if delete_checkpoint(path):
            logger.info("deleted old checkpoint %s", path)


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
    checkpoint_dir, min_interval_secs=0, timeout=None, timeout_fn=None, *, seconds_to_sleep=1.0
):
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
