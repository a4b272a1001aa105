"""Options of one save or restore call (TensorFlow's ``tf.train.CheckpointOptions``).

TF's fields are accepted with their meaning here, or refused with what to use instead:

- ``enable_async`` and its older name ``experimental_enable_async_checkpoint``: the same
  switch (either one turns async saves on).
- ``experimental_write_callbacks``: called after each save commits, on every process,
  with the checkpoint path if the callback takes an argument (TF's contract).
- ``experimental_io_device``: refused unless None. TF placed its save ops on that device;
  here every process writes its own shards from host memory through TensorStore, so
  there is no device to choose.

Restores (``Checkpoint.restore``/``read``) accept options for TF compatibility, but no
field changes a restore: it needs no coordination (so ``timeout_secs`` has nothing to
bound) and writes nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

__all__ = ["CheckpointOptions", "run_write_callbacks"]

_COMPRESSIONS = (None, "zstd", "gzip", "blosc")


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How a save runs.

    Args:
      enable_async: snapshot this process's shards to host memory, return, and write
        and commit in the background. ``Checkpoint.sync()`` waits; the next save waits
        for the previous one; a background failure is raised by the next call.
      compression: ``None`` (default: random weights barely compress and compression
        costs CPU on the save path), ``"zstd"``, ``"gzip"`` or ``"blosc"``.
      timeout_secs: bound on every wait for the other processes of the job and for
        storage. A crashed peer turns into a ``CoordinationTimeoutError``, a stalled
        object store into a ``StorageTimeoutError``, instead of a hang.
      pack_below_bytes: when a save has at least 64 arrays whose saved shards are at
        most this many bytes, those are packed per process and dtype into a few flat
        Zarr arrays instead of one directory each (docs/FORMAT.md, "Packed arrays");
        0 packs nothing. Must be the same on every process.
      experimental_enable_async_checkpoint: TF's older name of ``enable_async``.
      experimental_write_callbacks: functions called on every process after each save
        commits, as ``f(save_path)`` or ``f()``; an exception fails the save call
        (sync) or the next ``sync()`` (async), after the commit.
      experimental_io_device: TF only; must be None (see the module docstring).

    Raises:
      ValueError: a field outside what it allows, with what to use instead.
    """

    enable_async: bool = False
    compression: str | None = None
    timeout_secs: float = 600.0
    pack_below_bytes: int = 256 << 10  # dcheckpoint._packing.PACK_BELOW_BYTES
    experimental_enable_async_checkpoint: bool = False
    experimental_write_callbacks: Sequence[Callable] | None = None
    experimental_io_device: str | None = None

    def __post_init__(self):
        if self.compression not in _COMPRESSIONS:
            raise ValueError(
                f"CheckpointOptions.compression must be one of {_COMPRESSIONS}, "
                f"got {self.compression!r}"
            )
        if not self.timeout_secs > 0:
            raise ValueError(
                f"CheckpointOptions.timeout_secs must be positive, got {self.timeout_secs!r}"
            )
        if type(self.pack_below_bytes) is not int or self.pack_below_bytes < 0:
            raise ValueError(
                "CheckpointOptions.pack_below_bytes must be an int >= 0, got "
                f"{self.pack_below_bytes!r}"
            )
        if self.experimental_io_device is not None:
            raise ValueError(
                f"CheckpointOptions.experimental_io_device={self.experimental_io_device!r} "
                "is not supported: every process writes its own shards from host memory "
                "through TensorStore, so there is no I/O device to choose. Leave it None "
                "(the path you save to decides where bytes go)."
            )
        if self.experimental_enable_async_checkpoint:
            object.__setattr__(self, "enable_async", True)
        callbacks = self.experimental_write_callbacks
        if callbacks is not None:
            callbacks = tuple(callbacks)  # frozen options stay hashable
            for callback in callbacks:
                if not callable(callback):
                    raise ValueError(
                        "CheckpointOptions.experimental_write_callbacks must be callables, "
                        f"got {callback!r}"
                    )
            object.__setattr__(self, "experimental_write_callbacks", callbacks)


def run_write_callbacks(options: CheckpointOptions, save_path: str) -> None:
    """Calls each write callback with ``save_path`` (or with nothing, as TF does)."""
    for callback in options.experimental_write_callbacks or ():
        try:
            takes_path = bool(inspect.signature(callback).parameters)
        except (TypeError, ValueError):  # builtins without a signature
            takes_path = True
        callback(save_path) if takes_path else callback()
