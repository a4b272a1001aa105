"""The save queue: synchronous and asynchronous saves, in one order on every process.

All saves of a process run on the one collectives thread of ``_comm`` (with every
other checkpoint collective: manager starts, exports, ``save_pytree``), one at a time,
in the order they were issued. That single order is what keeps the collectives of
consecutive calls matched across processes (process 0's second save never meets
process 1's first), and it keeps our collectives off the training thread.

An async save snapshots this process's shards to host memory before returning, so the
caller may assign, donate or delete its arrays at once; the write and the commit run
in the background. A read of that directory meanwhile (``read_metadata``, so every
restore) waits for it rather than finding nothing. Its error is kept and raised by the
next ``save()`` or ``sync()``;
one nobody collected is printed at interpreter exit, which also waits for the save.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from ._comm import default_communicator, submit, track_save
from ._engine import plan_save, save_failed_here, snapshot, write_and_commit
from ._log import log_save
from ._options import CheckpointOptions, run_write_callbacks
from ._storage import open_storage

__all__ = ["Saver"]

_UNCOLLECTED: dict[int, Future] = {}
_LOCK = threading.Lock()


class Saver:
    """Runs the saves of one Checkpoint (see the module docstring)."""

    def __init__(self):
        self._pending: Future | None = None
        # The last save this saver committed: a save that raised after its commit (an
        # on_commit step or a write callback, which may fail on one process only) is
        # still a checkpoint, and every process knows it without asking storage.
        self.committed: str | None = None

    def save(
        self,
        directory: str,
        arrays: Mapping[str, Any],
        *,
        object_graph: Any = None,
        options: CheckpointOptions | None = None,
        on_commit: Callable[[str], None] | None = None,
        user_metadata: dict | None = None,
    ) -> str:
        """Saves ``arrays`` at ``directory``; see ``_engine.save_arrays``.

        With ``options.enable_async`` it returns once the shards are in host memory.
        ``on_commit(path)`` runs on every process after the commit (in the background
        for async saves).

        Raises:
          CheckpointError: this save failed (sync), or the previous async save did.
        """
        options = options or CheckpointOptions()
        called = time.perf_counter()
        self.sync()
        started = time.perf_counter()
        comm = default_communicator()
        try:
            plan = plan_save(arrays, is_coordinator=comm.is_coordinator)
            if options.enable_async:
                plan = snapshot(plan)
        except Exception as e:
            save_failed_here(directory, e, comm=comm, options=options)

        def run() -> str:
            path = write_and_commit(directory, plan, object_graph=object_graph,
                                    options=options, comm=comm, user_metadata=user_metadata)
            self.committed = path  # before the steps below, which may fail on one process
            ended = time.perf_counter()
            log_save(path, sum(m.nbytes for m in plan.arrays.values()), ended - started,
                     blocked if options.enable_async else ended - called)
            if on_commit is not None:
                on_commit(path)
            run_write_callbacks(options, path)
            return path

        # An async caller waits for the previous save and the snapshot; sync: for all.
        blocked = time.perf_counter() - called
        future = submit(run)
        if not options.enable_async:
            return future.result()
        with _LOCK:
            _UNCOLLECTED[id(future)] = future
        try:  # a read of it waits (read_metadata), by the location's normalised path
            track_save(open_storage(directory).path, future)
        except ValueError:
            pass  # not a location at all: the save itself fails and reports it
        self._pending = future
        return directory

    def sync(self) -> None:
        """Waits for the save in flight; raises its error if it failed."""
        future, self._pending = self._pending, None
        if future is None:
            return
        with _LOCK:
            _UNCOLLECTED.pop(id(future), None)
        future.result()


def wait_for_all() -> None:
    """Waits for every save issued so far, by any Saver of this process."""
    submit(lambda: None).result()


@atexit.register
def _report_uncollected() -> None:
    with _LOCK:
        futures = list(_UNCOLLECTED.values())
        _UNCOLLECTED.clear()
    for future in futures:
        error = future.exception()  # waits: an interpreter exit never drops a save
        if error is not None:
            print(
                f"dcheckpoint: an asynchronous save failed and nobody called sync() to see "
                f"it: {type(error).__name__}: {error}",
                file=sys.stderr,
            )
