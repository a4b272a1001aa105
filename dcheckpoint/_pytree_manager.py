"""``PytreeManager``: the functional, step-numbered manager JAX users expect.

``manager.save(step, state)`` / ``manager.restore(step, target)`` over immutable pytrees
(a TrainState, ``nnx.state(model)``, optax states), as Orbax's ``CheckpointManager``
is used. It is a :class:`~dcheckpoint.CheckpointManager` whose checkpoint is the tree
of the current save (`_TreeWriter`): the state file, the writer lock, retention
(``max_to_keep``, ``keep_checkpoint_every_n_hours``, ``best_fn``), preemption saves,
async saves and every agree step are that manager's, not a copy. Checkpoints are
``<directory>/<checkpoint_name>-<step>``, in ``save_pytree``'s format, so
``restore_pytree``, ``Checkpoint`` and ``dcheckpoint ls`` read them too.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable
from typing import Any

from ._async import Saver
from ._engine import read_metadata, save_failed_here
from ._manager import CheckpointManager
from ._manager_extras import whole_number
from ._options import CheckpointOptions
from ._pytree import pytree_arrays, restore_pytree
from ._user_metadata import check_user_metadata
from .errors import CheckpointNotFoundError

__all__ = ["PytreeManager"]

logger = logging.getLogger(__name__)


class _Counter:
    """The save counter CheckpointManager keeps on its checkpoint (saves are named by
    step here; the counter only counts them)."""

    def __init__(self):
        self.value = 0

    def assign(self, value) -> None:
        self.value = int(value)


class _TreeWriter:
    """What CheckpointManager asks of its checkpoint, for a pytree handed to each save."""

    def __init__(self):
        self.save_counter = _Counter()
        self.tree: Any = None  # the tree of the save in progress (set by PytreeManager)
        self._saver = Saver()

    def write(self, file_prefix: str, options=None, *, on_commit=None, metadata=None) -> str:
        try:
            user_metadata = check_user_metadata(metadata)
            arrays, graph = pytree_arrays(self.tree)
        except Exception as e:  # the other processes are (or will be) in the save
            self._saver.sync()  # as they do first: an earlier save's error wins
            save_failed_here(file_prefix, e, options=options)
        return self._saver.save(file_prefix, arrays, object_graph=graph, options=options,
                                on_commit=on_commit, user_metadata=user_metadata)

    def restore(self, save_path: str, options=None):
        del options
        return restore_pytree(save_path)

    def _dc_flatten(self) -> tuple[dict, dict]:
        """What a save of the current tree writes: ({array path: value}, graph)."""
        return pytree_arrays(self.tree)

    def sync(self) -> None:
        self._saver.sync()

    def _committed(self, path: str) -> bool:
        return self._saver.committed == path


class PytreeManager(CheckpointManager):
    """Saves and restores pytrees by training step, keeping the newest ``max_to_keep``.

    In a multi-process job every process makes the same calls with the same steps.

    Args:
      directory: where checkpoints and the state file live (created if missing): a
        local path or an object store URL.
      max_to_keep: how many checkpoints stay; None keeps all.
      keep_checkpoint_every_n_hours, best_fn, best_mode, save_on_preemption,
        checkpoint_name: as :class:`CheckpointManager`.
      save_interval_steps: save only at steps that are multiples of it (``save`` may
        then be called every step); a preemption notice saves at the agreed step anyway.
      options: the default ``CheckpointOptions`` of every save, e.g.
        ``CheckpointOptions(enable_async=True)``.
      local_directory: a node-local directory (tmpfs, local NVMe) for the local tier
        (see docs/LOCAL_TIER.md): each process's own shards plus a copy of one peer's,
        saved asynchronously every ``local_every`` steps beside the persistent
        checkpoints. It belongs to the host: a restarted job may hand it to any rank.
      local_every: save to the local tier at steps that are multiples of it (default 1).
      local_max_to_keep: committed local steps kept in each local directory.
      local_failure_domain: what this process fails with (default: its host name;
        e.g. a rack): each peer copy goes to another domain when there is one.

    Example:
      >>> abstract = jax.eval_shape(create_state)            # shapes, dtypes, shardings
      >>> with PytreeManager("/tmp/run", max_to_keep=3) as manager:
      ...     state = manager.restore(target=abstract) if manager.latest_step() else create_state()
      ...     for step in range(start, steps):
      ...         state = train_step(state)
      ...         manager.save(step, state, metadata={"loss": loss})
    """

    _NUMBER_ARGUMENT = "step"  # what a refused number is called in the error

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = None, *,
                 keep_checkpoint_every_n_hours: float | None = None,
                 checkpoint_name: str = "ckpt", save_interval_steps: int | None = None,
                 best_fn: Callable[[dict], float] | None = None, best_mode: str = "max",
                 save_on_preemption: bool = False,
                 options: CheckpointOptions | None = None,
                 local_directory: str | os.PathLike | None = None,
                 local_every: int | None = None, local_max_to_keep: int = 2,
                 local_failure_domain: str | None = None) -> None:
        if save_interval_steps is not None and (
                isinstance(save_interval_steps, bool) or not isinstance(
                    save_interval_steps, numbers.Integral) or save_interval_steps < 1):
            raise ValueError(
                f"save_interval_steps must be a positive int or None, got {save_interval_steps!r}"
            )
        self._save_interval_steps = save_interval_steps
        self._options = options
        super().__init__(_TreeWriter(), directory, max_to_keep, keep_checkpoint_every_n_hours,
                         checkpoint_name, best_fn=best_fn, best_mode=best_mode,
                         save_on_preemption=save_on_preemption,
                         local_directory=local_directory, local_every=local_every,
                         local_max_to_keep=local_max_to_keep,
                         local_failure_domain=local_failure_domain)

    def save(self, step: int, tree: Any, *, metadata: dict | None = None,
             options: CheckpointOptions | None = None, force: bool = False) -> str | None:
        """Saves ``tree`` as the checkpoint of ``step``, then applies retention.

        Args:
          step: the training step, an int (numpy ints and 0-d integer arrays too).
          tree: any pytree of arrays (see ``save_pytree``).
          metadata: a small JSON dict stored with it; ``"step"`` is added.
          options: ``CheckpointOptions`` of this save (default: the manager's). An
            async save returns once the shards are in host memory; ``sync()`` waits.
          force: save even where ``save_interval_steps`` says not to.

        Returns:
          The checkpoint's path, or None when ``save_interval_steps`` skipped it.
        """
        self._checkpoint.tree = tree
        try:
            return super().save(checkpoint_number=step, check_interval=not force,
                                options=options or self._options, metadata=metadata)
        finally:
            self._checkpoint.tree = None  # an async save holds its own host copy

    def _next_number(self, checkpoint_number, check_interval) -> int | None:
        every = self._save_interval_steps
        if check_interval and every and checkpoint_number is not None and (
                checkpoint_number % every):
            return None
        return super()._next_number(checkpoint_number, check_interval)

    _names_steps = True

    def restore(self, step: int | None = None, target: Any = None, *,
                cast_dtypes: bool = False) -> Any:
        """Restores checkpoint ``step`` (default: the latest) into ``target``.

        With a local tier, the newest step complete there (own and peer copies of
        every process together) that is at least as new as the latest persistent
        checkpoint is restored from it, fetching from peers only what this process
        lacks; otherwise (or for a ``step`` the local tier lacks) the persistent
        checkpoint, with a log line saying why. Every process gets the same step.
        :attr:`restored_from` says which.

        Args:
          step: which step; None for :meth:`latest_step`.
          target: as ``restore_pytree``: a pytree of ``jax.ShapeDtypeStruct``s
            (``jax.eval_shape``), arrays or shardings; None gives the tree as saved.
          cast_dtypes: cast saved values to the target's dtypes (see ``restore_pytree``).

        Raises:
          CheckpointNotFoundError: no checkpoint yet, or none for ``step`` (the message
            lists the steps there are).
        """
        if self._local is not None:
            restored = []
            wanted = None if step is None else whole_number(step, "step")
            opened = self._restore_local(wanted, lambda o: restored.append(restore_pytree(
                o.where, target, cast_dtypes=cast_dtypes, source=o)))
            if opened is not None:
                return restored[-1]
        path = self._committed_path(self._step_or_latest(step))
        restored = restore_pytree(path, target, cast_dtypes=cast_dtypes)
        self.restored_from = path
        return restored

    def metadata(self, step: int | None = None) -> dict:
        """The metadata dict saved with ``step`` (default: the latest), ``"step"`` in it.

        Raises:
          CheckpointNotFoundError: as :meth:`restore`.
        """
        return read_metadata(self._committed_path(self._step_or_latest(step))).user_metadata

    def _step_or_latest(self, step) -> int:
        if step is not None:
            return whole_number(step, "step")
        self.sync()  # an async save in flight is the latest once committed
        latest = self.latest_step()
        if latest is None:
            raise CheckpointNotFoundError(
                f"No checkpoint in {self._directory!r}: nothing saved yet")
        return latest

    def restore_or_initialize(self):
        raise TypeError(
            "PytreeManager has no object to initialise: use "
            "`manager.restore(target=abstract) if manager.latest_step() is not None else init()`"
        )

    def close(self) -> None:
        """Waits for a save in flight (raising its error), then gives the directory's
        writer lock and the preemption handler back."""
        try:
            self.sync()
        finally:
            self._release_lock()
            if self._preemption is not None:
                self._preemption.close()

    def __enter__(self) -> PytreeManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
