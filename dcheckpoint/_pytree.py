"""The functional API for JAX users who want no object graph: save a pytree, restore it
onto a target pytree of shardings."""

from __future__ import annotations

from typing import Any

import jax

from ._engine import read_metadata, restore_arrays, save_arrays
from ._gc import paused as _gc_paused
from ._options import CheckpointOptions
from ._paths import join_path
from ._tracking import key_name
from .errors import CheckpointMismatchError

__all__ = ["save_pytree", "restore_pytree"]


def _flatten(tree: Any) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    named = {}
    for keys, leaf in leaves:
        named[join_path(key_name(k) for k in keys) or "value"] = leaf
    return named, treedef


@_gc_paused
def save_pytree(
    path: str, tree: Any, *, options: CheckpointOptions | None = None
) -> str:
    """Saves every array leaf of ``tree`` as one checkpoint at ``path``.

    Leaves are jax.Arrays (any sharding), numpy arrays or Python scalars; their tree
    paths ("params/dense/kernel") become the array paths. Collective under multi-process.

    Returns:
      ``path``.
    """
    named, _ = _flatten(tree)
    none_leaves = [k for k, v in named.items() if v is None]
    if none_leaves:
        raise ValueError(f"save_pytree: leaves {none_leaves[:5]} are None; nothing to save")
    return save_arrays(path, named, object_graph={"kind": "pytree", "leaves": sorted(named)},
                       options=options)


@_gc_paused
def restore_pytree(path: str, target: Any) -> Any:
    """Restores the checkpoint at ``path`` into the structure of ``target``.

    Args:
      target: a pytree whose leaves say where each array goes: a jax.Array or
        ``jax.ShapeDtypeStruct`` with a sharding (restored onto that sharding, shape and
        dtype checked), a ``Sharding``, a numpy array, or None (host numpy).
    Returns:
      a pytree of the same structure holding the restored arrays.
    Raises:
      CheckpointMismatchError: the checkpoint lacks a leaf of ``target`` or disagrees
        on a shape or dtype.
    """
    named, treedef = _flatten(target)
    metadata = read_metadata(path)
    missing = sorted(set(named) - set(metadata.arrays))
    if missing:
        raise CheckpointMismatchError(
            f"Checkpoint {path!r} has no arrays {missing[:5]} that the restore target "
            f"expects; it holds {sorted(metadata.arrays)[:10]}"
        )
    restored = restore_arrays(path, named, metadata=metadata)
    return jax.tree_util.tree_unflatten(treedef, [restored[k] for k in named])
