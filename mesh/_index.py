"""Layout checks: sharding specs against a mesh's axes, and each device's block shape.

Which slice each device holds is not computed here: ``Layout`` asks JAX
(``NamedSharding.devices_indices_map``), as the checkpoint engine's plans do
(``addressable_shards``, ``addressable_devices_indices_map``), so there is one source
of truth for shard ownership, JAX's. What this module adds is validation with clear
errors and the replica numbering rule (``replica_ids_of``) applied to JAX's indices.
Nothing here touches a device.

A spec entry is a mesh axis name (the dimension is split over that axis), a tuple of
names (split over the product of their sizes, the first name major, as in
``PartitionSpec``), or ``UNSHARDED`` (every position holds the whole dimension).

Uneven dimensions are refused: JAX itself will not build a ``NamedSharding`` array whose
sharded dimension is not a multiple of the axis size ("does not evenly divide"), so a
layout that the math could describe would still fail at ``device_put``; failing here,
with the dimension named, is the earlier and clearer error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = [
    "UNSHARDED",
    "SpecEntry",
    "MeshAxes",
    "normalize_specs",
    "normalize_mesh_axes",
    "shard_shape",
    "replica_ids_of",
]

UNSHARDED = "unsharded"
"""Spec entry for a dimension held whole by every device (DTensor's word for it)."""

SpecEntry = str | tuple[str, ...]
MeshAxes = Mapping[str, int] | Sequence[tuple[str, int]]
Slices = tuple[slice, ...]


def normalize_mesh_axes(mesh_axes: MeshAxes) -> tuple[tuple[str, int], ...]:
    """Return mesh axes as ``((name, size), ...)`` in mesh order.

    Args:
        mesh_axes: a mapping name -> size (insertion order is mesh order) or a
            sequence of ``(name, size)`` pairs.

    Raises:
        ValueError: a name repeats, is ``UNSHARDED`` or a size is not a positive int.
    """
    pairs = tuple(mesh_axes.items()) if isinstance(mesh_axes, Mapping) else tuple(mesh_axes)
    seen: set[str] = set()
    for name, size in pairs:
        if not isinstance(name, str) or name == UNSHARDED or name in seen:
            raise ValueError(
                f"mesh axis names must be distinct strings other than {UNSHARDED!r}; "
                f"found {name!r} in {pairs!r}"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh axis {name!r} must have a positive int size, found {size!r}")
        seen.add(name)
    return tuple((name, int(size)) for name, size in pairs)


def normalize_specs(specs: Sequence[object], axis_names: Sequence[str]) -> tuple[SpecEntry, ...]:
    """Validate and canonicalise sharding specs against a mesh's axis names.

    ``None`` and the empty tuple mean ``UNSHARDED`` (``PartitionSpec`` spells it so); a
    one-name tuple means that name, so equal layouts compare equal however spelled.

    Args:
        specs: one entry per array dimension.
        axis_names: the mesh's axis names.

    Returns:
        One entry per dimension: ``UNSHARDED``, an axis name, or a tuple of 2+ names.

    Raises:
        ValueError: an entry names an axis the mesh lacks, or an axis is used twice.
        TypeError: an entry is neither a string, a tuple/list of strings nor None.
    """
    if isinstance(specs, str):
        raise TypeError(f"sharding specs must be a sequence of entries, found the string {specs!r}")
    known = set(axis_names)
    used: set[str] = set()
    out: list[SpecEntry] = []
    for dim, entry in enumerate(specs):
        names = _entry_names(entry, dim)
        for name in names:
            if name not in known:
                raise ValueError(
                    f"sharding spec for dimension {dim} names mesh axis {name!r}, "
                    f"but the mesh has axes {tuple(axis_names)!r}"
                )
            if name in used:
                raise ValueError(
                    f"mesh axis {name!r} is used twice in sharding specs {tuple(specs)!r}; "
                    "each axis may shard at most one dimension"
                )
            used.add(name)
        out.append(UNSHARDED if not names else names[0] if len(names) == 1 else names)
    return tuple(out)


def _entry_names(entry: object, dim: int) -> tuple[str, ...]:
    """The mesh axis names one spec entry shards over (empty for unsharded)."""
    if entry is None or entry == UNSHARDED:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, tuple | list) and all(isinstance(n, str) for n in entry):
        if UNSHARDED in entry:
            raise ValueError(f"dimension {dim}: {UNSHARDED!r} cannot be combined with axes")
        return tuple(entry)
    raise TypeError(
        f"sharding spec for dimension {dim} must be a mesh axis name, a tuple of names or "
        f"{UNSHARDED!r}; found {entry!r}"
    )


def _plan(global_shape: Sequence[int], specs: Sequence[object], mesh_axes: MeshAxes):
    """Check everything once; return (shape, axes, canonical specs, per-dim split count)."""
    axes = normalize_mesh_axes(mesh_axes)
    sizes = dict(axes)
    shape = tuple(int(d) for d in global_shape)
    canon = normalize_specs(specs, [name for name, _ in axes])
    if len(canon) != len(shape):
        raise ValueError(
            f"sharding specs {canon!r} have {len(canon)} entries but the global shape "
            f"{shape!r} has rank {len(shape)}; give one entry per dimension"
        )
    splits = []
    for dim, (size, entry) in enumerate(zip(shape, canon, strict=True)):
        if size < 0:
            raise ValueError(f"global shape {shape!r} has a negative dimension {dim}")
        names = _entry_names(entry, dim)
        parts = math.prod(sizes[n] for n in names)
        if size % parts:
            raise ValueError(
                f"dimension {dim} of global shape {shape!r} has size {size}, which mesh "
                f"axis {entry!r} of size {parts} does not evenly divide; JAX refuses uneven "
                "shards too, so pad the array or choose another layout"
            )
        splits.append(parts)
    return shape, axes, canon, tuple(splits)


def shard_shape(
    global_shape: Sequence[int], specs: Sequence[object], mesh_axes: MeshAxes
) -> tuple[int, ...]:
    """Shape of the block each device holds (the same on every device).

    Raises:
        ValueError: bad specs, rank mismatch, or a sharded dimension not divisible by
            its axis size.
    """
    shape, _, _, splits = _plan(global_shape, specs, mesh_axes)
    return tuple(size // parts for size, parts in zip(shape, splits, strict=True))


def replica_ids_of(slices: Sequence[Slices]) -> list[int]:
    """Replica ids of the copies at each position: identical slices numbered 0, 1, ...

    The rule JAX's ``device_replica_id_map`` applies (walk devices in mesh order, give
    each the count of earlier devices holding an identical index), so a zero-size
    dimension, every slice empty and equal, numbers all copies 0..n-1 as JAX does.
    """
    seen: dict[tuple[tuple[int, int], ...], int] = {}
    out = []
    for index in slices:
        key = tuple((s.start, s.stop) for s in index)
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out
