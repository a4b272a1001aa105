"""Keep the best: which managed checkpoints a ``best_fn`` manager keeps, as pure list math.

With ``CheckpointManager(best_fn=..., best_mode=...)`` retention keeps the ``max_to_keep``
checkpoints with the best metric, plus always the latest one (a job resumes from its
newest state, however bad its metric). The metric of a checkpoint is ``best_fn`` of the
metadata dict stored in that checkpoint, so a new manager recomputes it from disk: the
checkpoint itself is the only record, and no state file format changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

__all__ = ["BEST_MODES", "check_best_fn", "metric_of", "to_drop"]

BEST_MODES = ("max", "min")


def check_best_fn(best_fn, best_mode) -> None:
    """Raises ValueError for a ``best_fn`` that is not callable or an unknown mode."""
    if best_fn is not None and not callable(best_fn):
        raise ValueError(
            f"best_fn must be a function of the save's metadata dict returning a number, "
            f"got {type(best_fn).__name__}"
        )
    if best_mode not in BEST_MODES:
        raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")


def metric_of(best_fn: Callable[[dict], object], metadata: Mapping, *, where: str) -> float:
    """``best_fn(metadata)`` as a float; NaN ranks worst.

    Raises:
      ValueError: ``best_fn`` returned something that is not a real number (a bool
        included: a bool metric is almost always a bug).
    """
    value = best_fn(dict(metadata))
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy and jax scalars
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"best_fn must return a real number for {where}, got {value!r} "
            f"({type(value).__name__}) from metadata {dict(metadata)!r}"
        )
    return float(value)


def to_drop(paths: Sequence[str], metrics: Mapping[str, float | None], keep: int,
            mode: str) -> list[str]:
    """The paths retention removes, oldest first.

    Args:
      paths: the managed checkpoints, oldest first; the last one is the latest.
      metrics: each path's metric; None or NaN (unreadable, or a NaN loss) ranks worst.
      keep: how many of the best to keep (``max_to_keep``).
      mode: "max" (higher is better) or "min".

    Returns:
      Every path that is neither among the ``keep`` best nor the latest. Ties go to
      the newer checkpoint.
    """
    if not paths:
        return []
    sign = 1.0 if mode == "max" else -1.0

    def rank(i: int) -> tuple:
        value = metrics.get(paths[i])
        valid = value is not None and not math.isnan(value)
        return (valid, sign * value if valid else 0.0, i)

    best = sorted(range(len(paths)), key=rank, reverse=True)[:keep]
    kept = {paths[i] for i in best} | {paths[-1]}
    return [p for p in paths if p not in kept]
