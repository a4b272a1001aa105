"""The caller's per-save metadata: a small JSON dict stored in the checkpoint's metadata file.

``save(..., metadata={"loss": 0.31, "config_sha": "ab12..."})`` stores the dict next to
the array table, so ``read_metadata(path).user_metadata`` and ``dcheckpoint ls`` show it
without reading an array, and ``CheckpointManager(best_fn=...)`` ranks checkpoints by it.
It is checked before anything is written: a value JSON cannot hold exactly (a set, an
object, NaN) or a dict over :data:`MAX_USER_METADATA_BYTES` is refused with the key that
caused it, instead of failing in the background of an async save or being stored lossy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax
import numpy as np

__all__ = ["MAX_USER_METADATA_BYTES", "check_user_metadata"]

# Metadata is read whole by `ls`, by every new manager with a best_fn and by restores;
# keep it a note about the save, not a place for data (put arrays in the checkpoint).
MAX_USER_METADATA_BYTES = 64 * 1024
_MAX_DEPTH = 32


def check_user_metadata(metadata: Mapping | None) -> dict | None:
    """A JSON-ready copy of ``metadata``: str keys; str, int, float, bool, None, lists, dicts.

    numpy scalars and 0-d numpy or JAX arrays (``float(loss)`` forgotten) become
    Python numbers.

    Raises:
      ValueError: not a mapping, a key that is not a str, a value of another type, a
        non-finite float, nesting deeper than 32, or more than 64 KiB once encoded;
        the message names the key.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise ValueError(
            f"Checkpoint metadata must be a dict of JSON values, got {type(metadata).__name__}"
        )
    checked = _check(metadata, "metadata", 0)
    size = len(json.dumps(checked, sort_keys=True).encode())
    if size > MAX_USER_METADATA_BYTES:
        biggest = max(checked, key=lambda k: len(json.dumps(checked[k])), default=None)
        raise ValueError(
            f"Checkpoint metadata is {size} bytes as JSON, more than the "
            f"{MAX_USER_METADATA_BYTES} allowed (largest entry: {biggest!r}); store large "
            "values as arrays in the checkpoint instead"
        )
    return checked


def _check(value, where: str, depth: int):
    if depth > _MAX_DEPTH:
        raise ValueError(f"Checkpoint metadata {where}: nested more than {_MAX_DEPTH} deep")
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0 or isinstance(
            value, np.generic):
        value = np.asarray(value).item()  # a loss from a jitted step is a 0-d jax.Array
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"Checkpoint metadata {where}: {value!r} is not a finite number, which JSON "
                "cannot store; store it as a string or leave it out"
            )
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"Checkpoint metadata {where}: key {key!r} is a {type(key).__name__}; "
                    "JSON object keys must be str"
                )
            out[key] = _check(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_check(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise ValueError(
        f"Checkpoint metadata {where}: a {type(value).__name__} is not a JSON value; "
        "expected str, int, float, bool, None, or a list or dict of those"
    )
