"""What JAX users reach for on a CheckpointManager beyond TF's API: steps as integers,
deletion, keep-the-best retention and saving on preemption.

A mixin of :class:`~dcheckpoint.CheckpointManager`, kept apart so that ``_manager.py``
stays TensorFlow's manager; these methods use the manager's state (its lock, managed
list, communicator) exactly as its own methods do.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from typing import TYPE_CHECKING

from ._best import metric_of, to_drop
from ._comm import agree, run_ordered
from ._engine import read_metadata
from ._options import CheckpointOptions
from ._state_file import STATE_FILENAME, is_committed
from ._storage import open_storage

if TYPE_CHECKING:
    from ._status import CheckpointLoadStatus
from .errors import CheckpointNotFoundError, CoordinationError

__all__ = ["ManagerExtras", "evaluate_counter"]

logger = logging.getLogger("dcheckpoint._manager")


def whole_number(value, what: str) -> int:
    """``value`` as a checkpoint or step number: an int, a numpy integer, or an integral
    0-d array or Variable holding one, >= 0.

    Anything else would be named wrongly: ``int(7.5)`` saves ``ckpt-7``; ``-1`` writes
    ``ckpt--1``, which no step parser reads back.

    Raises:
      TypeError: not an integer (a float, a bool, a string, an array of floats or of
        more than one element).
      ValueError: a negative integer.
    """
    held = value.value if hasattr(value, "value") else value  # a Variable
    integral_array = (hasattr(held, "dtype") and getattr(held, "shape", None) == ()
                      and held.dtype.kind in "iu")
    if not integral_array and (isinstance(held, bool) or not isinstance(held, numbers.Integral)):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    number = int(held)
    if number < 0:
        raise ValueError(f"{what} must be >= 0, got {number}")
    return number


def evaluate_counter(counter) -> int:
    """The integer value of a step counter: a Variable, an array or a Python int."""
    value = counter.value if hasattr(counter, "value") else counter
    return int(value)


class ManagerExtras:
    """Steps, ``delete``, ``best_fn`` retention and preemption (see the module docstring)."""

    # -- steps as integers ---------------------------------------------------------------

    def _step_path(self, step) -> str | None:
        """The checkpoint of ``step``: ``<prefix>-<step>``, or with a ``step_counter`` the
        committed one saved at that step (None if there is none)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {step!r} ({type(step).__name__})")
        if self._step_counter is None:
            return f"{self._prefix}-{int(step)}"
        return {s: p for p, s in self._paths_and_steps()}.get(int(step))

    def _step_of(self, path: str | None) -> int | None:
        if path is None:
            return None
        if self._step_counter is not None:
            return self._saved_step(path)
        match = self._step_pattern().fullmatch(os.path.basename(path))
        return int(match.group(1)) if match else None

    def _step_pattern(self) -> re.Pattern:
        return re.compile(rf"{re.escape(self._checkpoint_name)}-(\d+)")

    def _paths_and_steps(self) -> list[tuple[str, int]]:
        """``(path, step)`` of every committed checkpoint in the directory, by step.

        A checkpoint's name carries TF's save number; with a ``step_counter`` the
        training step it was saved at is the ``"step"`` of its metadata (saves every
        ``checkpoint_interval`` steps: ckpt-1, ckpt-2, ckpt-3 at steps 1, 4, 7).
        """
        storage = open_storage(self._directory)
        pattern = self._step_pattern()
        found = []
        for name in storage.list_dir():
            match = pattern.fullmatch(name)
            path = storage.join(name) if match else None
            if match and is_committed(path):
                number = int(match.group(1))
                found.append((path, number if self._step_counter is None
                              else self._saved_step(path, number)))
        return sorted(found, key=lambda item: item[1])

    def _saved_step(self, path: str, number: int | None = None) -> int | None:
        """The ``"step"`` in a checkpoint's metadata (its number if it has none)."""
        cache = self._steps_by_path
        if path not in cache:
            try:
                step = (read_metadata(path).user_metadata or {}).get("step", number)
            except CheckpointNotFoundError:
                return number
            cache[path] = step if isinstance(step, int) and not isinstance(
                step, bool) else number
        return cache[path]

    def all_steps(self) -> list[int]:
        """Every committed checkpoint's step in the directory, ascending.

        The checkpoint number, or with a ``step_counter`` the step each was saved at.
        Managed checkpoints and those kept for good by ``keep_checkpoint_every_n_hours``
        alike (unlike :attr:`checkpoints`, TF's list of the managed paths). Lists the
        directory, so it sees what is on disk now.
        """
        return [step for _, step in self._paths_and_steps() if step is not None]

    def latest_step(self) -> int | None:
        """The step of :attr:`latest_checkpoint`, or None when there is none."""
        return self._step_of(self.latest_checkpoint)

    def restore(self, step: int, options: CheckpointOptions | None = None
                ) -> CheckpointLoadStatus:
        """Restores checkpoint ``step`` into :attr:`checkpoint`.

        Returns:
          The load status of ``checkpoint.restore``.

        Raises:
          CheckpointNotFoundError: no committed checkpoint of that number; the message
            lists the steps there are.
          TypeError: ``step`` is not an int.
        """
        status = self._checkpoint.restore(self._committed_path(step), options)
        if self._checkpoint_interval is not None:
            self._last_checkpoint_step = evaluate_counter(self._step_counter)
        return status

    def _committed_path(self, step) -> str:
        """The path of the committed checkpoint of ``step``, waiting for a save of it
        still in flight (an async save this process started is committed first)."""
        path = self._step_path(step)
        if path is None or not is_committed(path):
            self.sync()
            path = self._step_path(step)
        if path is None or not is_committed(path):
            expected = f"expected {path}" if path else "none was saved at that step"
            raise CheckpointNotFoundError(
                f"No committed checkpoint for step {step} in {self._directory!r} "
                f"({expected}); available steps: {self.all_steps()}"
            )
        return path

    def delete(self, step: int) -> str:
        """Deletes checkpoint ``step`` (collective: every process calls it, as ``save``).

        Waits for an async save in flight first. The coordinator writes the state file
        without it first, then deletes it commit marker first (a deletion cut short
        leaves no checkpoint a reader would take for whole); when ``step`` was the
        latest, the newest remaining managed checkpoint becomes the latest.

        Returns:
          The deleted checkpoint's path, on every process.

        Raises:
          CheckpointNotFoundError: no committed checkpoint of that number (on every
            process; nothing is changed).
        """
        self.sync()
        path = self._step_path(step)

        def decide(paths: list[str]) -> str:
            """(coordinator) Deletes ``path`` once every process names it."""
            if any(p != path for p in paths):
                raise CoordinationError(
                    f"The processes asked to delete different checkpoints ({paths}, in "
                    "process order), so nothing was deleted; every process must delete "
                    "the same step"
                )
            if path is None or not is_committed(path):
                raise CheckpointNotFoundError(
                    f"No committed checkpoint for step {step} in {self._directory!r} to "
                    f"delete; available steps: {self.all_steps()}"
                )
            # The state without it goes first: a reader of the state file never finds a
            # checkpoint that is already gone.
            self._forget(path)
            self._record_after_delete(pending_deletion=[path])
            self._delete(path)
            return path

        run_ordered(lambda: agree(self._comm, path, decide, kind="delete",
                                  tag=f"delete {path!r}",
                                  timeout_secs=CheckpointOptions().timeout_secs))
        if not self._comm.is_coordinator:
            self._forget(path)
        return path

    def _forget(self, path: str) -> None:
        """Drops ``path`` from the in-memory state (all processes)."""
        with self._lock:
            self._maybe_delete.pop(path, None)
            self._metrics.pop(path, None)
            if self._latest_checkpoint == path:
                self._latest_checkpoint = next(reversed(self._maybe_delete), None)

    def _record_after_delete(self, pending_deletion) -> None:
        """The state file before a delete (coordinator); removed when nothing is left."""
        with self._lock:
            if self._latest_checkpoint is not None:
                self._record_state(pending_deletion=pending_deletion)
                return
        open_storage(self._directory).remove(STATE_FILENAME)

    def _check_metric(self, checkpoint_number, metadata) -> None:
        """Raises ValueError now if ``best_fn`` gives no number for this save, before
        the save counter, the interval clock or an export move."""
        if self._best_fn is None:
            return
        if checkpoint_number is not None:
            number = evaluate_counter(checkpoint_number)
        else:
            number = evaluate_counter(self._checkpoint.save_counter) + 1
        metric_of(self._best_fn, {"step": number, **(metadata or {})},
                  where=f"{self._prefix}-{number}")

    # -- keep the best -------------------------------------------------------------------

    def _sweep_best(self) -> list[str]:
        """``_sweep`` with ``best_fn``: drops all but the best and the latest (see _best);
        returns the checkpoints to delete (the caller records the new state first)."""
        victims: list[str] = []
        if not self._max_to_keep or len(self._maybe_delete) <= self._max_to_keep:
            return victims
        paths = list(self._maybe_delete)
        for path in paths:
            if path not in self._metrics:
                self._metrics[path] = self._read_metric(path)
        hours = self._keep_checkpoint_every_n_hours
        dropped = to_drop(paths, self._metrics, self._max_to_keep, self._best_mode)
        for path in dropped:
            timestamp = self._maybe_delete.pop(path)
            metric = self._metrics.pop(path, None)
            # As _sweep: a dropped checkpoint a period after the last preserved one stays.
            if hours and timestamp - hours * 3600.0 >= self._last_preserved_timestamp:
                self._last_preserved_timestamp = timestamp
                continue
            if self._comm.is_coordinator:
                logger.info("dropping %s: best_fn %s is not among the %d best",
                            path, metric, self._max_to_keep)
            victims.append(path)
        return victims

    def _read_metric(self, path: str) -> float | None:
        """``best_fn`` of a checkpoint's stored metadata; None (ranks worst) if unreadable."""
        try:
            metadata = read_metadata(path).user_metadata or {}
            return metric_of(self._best_fn, metadata, where=path)
        except Exception as e:  # noqa: BLE001 (a user function on old metadata)
            logger.warning("best_fn could not rank %s (%s: %s); it ranks worst",
                           path, type(e).__name__, e)
            return None

    # -- preemption ----------------------------------------------------------------------

    def reached_preemption(self, step) -> bool:
        """Whether every process is to save now, at ``step``, for a preemption notice.

        Collective: call it at every step on every process with the same step (with
        ``save_on_preemption=True``, ``save()`` does, with the step counter's value or
        the checkpoint number). A second call for the same step costs nothing.

        Raises:
          ValueError: the manager was made without ``save_on_preemption=True``.
        """
        if self._preemption is None:
            raise ValueError(
                "reached_preemption needs CheckpointManager(..., save_on_preemption=True), "
                "which installs the preemption watcher when the job starts"
            )
        return self._preemption.reached(step)

    def _check_preemption(self, checkpoint_number) -> bool:
        """Step 0 of a save with ``save_on_preemption``: ask every process (collective)."""
        self._save_calls += 1
        if self._preemption is None:
            return False
        if self._step_counter is not None:
            step = evaluate_counter(self._step_counter)
        elif checkpoint_number is not None:
            step = evaluate_counter(checkpoint_number)
        else:
            step = self._save_calls
        return self._preemption.reached(step)

    def _exit_preempted(self, path: str | None) -> None:
        """Waits for the preemption save's commit, then exits the program cleanly."""
        self.sync()
        logger.warning("preemption: %s committed; exiting",
                       path or self.latest_checkpoint or "nothing new to save")
        self._preemption.close()
        raise SystemExit(0)
