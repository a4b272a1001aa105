"""``Layout``: how each dimension of an array is split over a ``Mesh``.

A layout is DTensor's idea (one spec per dimension: a mesh axis or ``UNSHARDED``)
in JAX's terms: it converts to and from ``NamedSharding``/``PartitionSpec``, and says
which slice each device and process holds by asking JAX (``devices_indices_map`` of its
``NamedSharding``), the same source the checkpoint engine's plans use. Its JSON
form carries axis names and sizes but no device ids, so a saved layout stays
meaningful on another machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jax.sharding import NamedSharding, PartitionSpec

from mesh import _index
from mesh._index import UNSHARDED, SpecEntry
from mesh._mesh import Mesh

__all__ = ["Layout"]


class Layout:
    """One sharding spec per array dimension, over a mesh.

    Args:
        sharding_specs: per dimension, a mesh axis name, a tuple of names (split over
            their product, first name major, as in ``PartitionSpec``) or
            ``Layout.UNSHARDED``. ``None`` is read as ``UNSHARDED``.
        mesh: the ``Mesh`` the names refer to.

    Raises:
        ValueError: a spec names an axis the mesh lacks or uses an axis twice.
        TypeError: ``mesh`` is not a ``Mesh`` or a spec entry has the wrong type.
    """

    UNSHARDED = UNSHARDED

    def __init__(self, sharding_specs: Sequence[SpecEntry | None], mesh: Mesh):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"Layout needs a mesh.Mesh, found {type(mesh)!r}")
        self._specs = _index.normalize_specs(sharding_specs, mesh.axis_names)
        self._mesh = mesh

    @classmethod
    def replicated(cls, mesh: Mesh, rank: int) -> Layout:
        """Every device holds the whole array."""
        return cls([UNSHARDED] * _check_rank(rank), mesh)

    @classmethod
    def batch_sharded(
        cls, mesh: Mesh, batch_dim: SpecEntry, rank: int, axis_dim: int = 0
    ) -> Layout:
        """Array dimension ``axis_dim`` split over mesh axis ``batch_dim``, the rest whole.

        Raises:
            ValueError: ``axis_dim`` is outside ``[-rank, rank)``.
        """
        specs: list[SpecEntry] = [UNSHARDED] * _check_rank(rank)
        if not -rank <= axis_dim < rank:
            raise ValueError(f"axis_dim {axis_dim} is out of range for rank {rank}")
        specs[axis_dim] = batch_dim
        return cls(specs, mesh)

    @classmethod
    def from_sharding(cls, sharding: NamedSharding, rank: int) -> Layout:
        """The layout of a ``NamedSharding`` for an array of the given rank.

        A ``PartitionSpec`` shorter than ``rank`` leaves the trailing dimensions
        unsharded, as JAX does.

        Raises:
            TypeError: ``sharding`` is not a ``NamedSharding`` (other shardings have no
                per-dimension axis names to save).
            ValueError: the spec is longer than ``rank`` or uses ``UNCONSTRAINED``.
        """
        if not isinstance(sharding, NamedSharding):
            raise TypeError(
                f"Layout.from_sharding needs a jax.sharding.NamedSharding, found "
                f"{type(sharding).__name__}; reshard the array with a NamedSharding first"
            )
        spec = tuple(sharding.spec)
        if len(spec) > _check_rank(rank):
            raise ValueError(
                f"PartitionSpec {sharding.spec} has {len(spec)} entries, more than rank {rank}"
            )
        if any(entry is PartitionSpec.UNCONSTRAINED for entry in spec):
            raise ValueError(
                f"PartitionSpec {sharding.spec} is UNCONSTRAINED; a saved "
                "layout must say where every dimension lives"
            )
        padded = list(spec) + [None] * (rank - len(spec))
        return cls(padded, Mesh.from_jax(sharding.mesh))

    @property
    def sharding_specs(self) -> tuple[SpecEntry, ...]:
        """Canonical specs: ``UNSHARDED``, a name, or a tuple of 2+ names per dim."""
        return self._specs

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def rank(self) -> int:
        return len(self._specs)

    def to_partition_spec(self) -> PartitionSpec:
        """The equivalent ``PartitionSpec`` (``None`` for unsharded dimensions)."""
        return PartitionSpec(*(None if s == UNSHARDED else s for s in self._specs))

    def to_sharding(self) -> NamedSharding:
        """The equivalent ``NamedSharding`` on the wrapped JAX mesh."""
        return NamedSharding(self._mesh.jax_mesh, self.to_partition_spec())

    def _axes(self) -> dict[str, int]:
        return self._mesh.shape

    def shard_shape(self, global_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of each device's block; see ``mesh.shard_shape``."""
        return _index.shard_shape(global_shape, self._specs, self._axes())

    def device_slices(self, global_shape: Sequence[int]) -> list[tuple[slice, ...]]:
        """Slice held by each device of ``mesh.devices.flat``, as JAX places it.

        Every device of the mesh, this process's or not, so any process can compute
        every process's share.

        Returns:
            One tuple per device, one ``slice(start, stop)`` per dimension, with explicit
            ``start`` and ``stop`` (never ``None``) so slices compare by value.

        Raises:
            ValueError: rank mismatch, or a sharded dimension its axes do not evenly
                divide (JAX refuses such arrays at ``device_put``; this names the dim).
        """
        self.shard_shape(global_shape)  # refuses a rank mismatch or an uneven dim, by name
        shape = tuple(int(d) for d in global_shape)
        by_device = self.to_sharding().devices_indices_map(shape)
        return [
            tuple(slice(*s.indices(n)[:2]) for s, n in zip(by_device[d], shape, strict=True))
            for d in self._mesh.devices.flat
        ]

    def replica_ids(self, global_shape: Sequence[int]) -> list[int]:
        """Replica id of each device's copy, as JAX numbers them (``replica_id``)."""
        return _index.replica_ids_of(self.device_slices(global_shape))

    def process_slices(
        self, global_shape: Sequence[int], device_process_index: Sequence[int] | None = None
    ) -> dict[int, list[tuple[slice, ...]]]:
        """The slices each process writes: those its devices hold as replica 0.

        Writing replica 0 only means every element is written by exactly one process,
        however many copies the layout keeps (the rule of the engine's save plan).

        Args:
            global_shape: the global array's shape.
            device_process_index: the process of the device at each mesh position,
                row-major; default each device's own ``process_index``. Another
                assignment plans as a job with other hosts would (tests, tools).

        Returns:
            Every process named -> its slices in mesh order ([] if it writes nothing).

        Raises:
            ValueError: as for ``device_slices``, or ``device_process_index`` does not
                have one entry per device.
        """
        procs = (self._mesh.device_process_index if device_process_index is None
                 else [int(p) for p in device_process_index])
        if len(procs) != self._mesh.size:
            raise ValueError(
                f"device_process_index has {len(procs)} entries but the mesh has "
                f"{self._mesh.size} positions; give one process index per device"
            )
        slices = self.device_slices(global_shape)
        out: dict[int, list[tuple[slice, ...]]] = {p: [] for p in procs}
        for index, rid, proc in zip(slices, _index.replica_ids_of(slices), procs, strict=True):
            if rid == 0:
                out[proc].append(index)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description: specs and mesh axis names/sizes, no device ids."""
        return {
            "sharding_specs": [list(s) if isinstance(s, tuple) else s for s in self._specs],
            "mesh": {
                "axis_names": list(self._mesh.axis_names),
                "shape": list(self._mesh.shape.values()),
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], mesh: Mesh) -> Layout:
        """Rebuild a layout from ``to_json()`` output onto ``mesh``.

        Raises:
            ValueError: ``data`` is malformed or names unknown axes, or ``mesh``'s axis
                names or sizes differ from the ones recorded (restore onto another mesh
                with a new layout).
        """
        try:
            specs = data["sharding_specs"]
            recorded = dict(zip(data["mesh"]["axis_names"], data["mesh"]["shape"], strict=True))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                "layout JSON must be {'sharding_specs': [...], 'mesh': {'axis_names': [...], "
                f"'shape': [...]}}; found {data!r}"
            ) from err
        if list(recorded.items()) != list(mesh.shape.items()):
            raise ValueError(
                f"layout was recorded on mesh axes {recorded!r} but the given mesh has "
                f"{mesh.shape!r}; axis names and sizes must match"
            )
        if not isinstance(specs, list):
            raise ValueError(f"layout JSON 'sharding_specs' must be a list, found {specs!r}")
        try:
            return cls([tuple(s) if isinstance(s, list) else s for s in specs], mesh)
        except TypeError as err:
            raise ValueError(f"layout JSON has a malformed sharding spec: {err}") from err

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return self._specs == other._specs and self._mesh == other._mesh

    def __hash__(self) -> int:
        return hash((self._specs, self._mesh))

    def __repr__(self) -> str:
        return f"Layout({list(self._specs)!r}, mesh={self._mesh!r})"


def _check_rank(rank: int) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, found {rank!r}")
    return rank
