"""One log line per save and per restore, on the ``dcheckpoint`` logger.

Operators read throughput and stalls from logs, not from code: each line carries the
checkpoint path, the bytes of the arrays saved or restored (global, logical sizes: what
the checkpoint holds, whichever process wrote it), the seconds it took, the rate in
GB/s and, for saves, how long the caller was blocked (an async save returns after its
device-to-host snapshot; a sync save blocks for all of it). ``logging.getLogger(
"dcheckpoint").setLevel(logging.INFO)`` shows them; the ``extra`` fields carry the same
numbers for structured log handlers.
"""

from __future__ import annotations

import logging

__all__ = ["logger", "log_save", "log_restore"]

logger = logging.getLogger("dcheckpoint")


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def log_save(path: str, nbytes: int, seconds: float, blocked_secs: float) -> None:
    """Logs a committed save (every process; the numbers are the same save's)."""
    logger.info(
        "saved %s: %d bytes in %.3f s (%.3g GB/s), caller blocked %.3f s",
        path, nbytes, seconds, _rate(nbytes, seconds), blocked_secs,
        extra={"dcheckpoint": {"op": "save", "path": str(path), "bytes": nbytes,
                               "seconds": seconds, "blocked_secs": blocked_secs}},
    )


def log_restore(path: str, nbytes: int, seconds: float) -> None:
    """Logs a finished restore of ``nbytes`` of arrays (this process's call)."""
    logger.info(
        "restored %s: %d bytes in %.3f s (%.3g GB/s)",
        path, nbytes, seconds, _rate(nbytes, seconds),
        extra={"dcheckpoint": {"op": "restore", "path": str(path), "bytes": nbytes,
                               "seconds": seconds}},
    )
