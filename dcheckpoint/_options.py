"""Options of one save or restore call (TensorFlow's ``tf.train.CheckpointOptions``)."""

from __future__ import annotations

import dataclasses

__all__ = ["CheckpointOptions"]

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
      timeout_secs: bound on every wait for the other processes of the job. A crashed
        peer turns into a ``CoordinationTimeoutError`` instead of a hang.
      pack_below_bytes: when a save has at least 64 arrays whose saved shards are at
        most this many bytes, those are packed per process and dtype into a few flat
        Zarr arrays instead of one directory each (docs/FORMAT.md, "Packed arrays");
        0 packs nothing. Must be the same on every process.
    """

    enable_async: bool = False
    compression: str | None = None
    timeout_secs: float = 600.0
    pack_below_bytes: int = 256 << 10  # dcheckpoint._packing.PACK_BELOW_BYTES

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
