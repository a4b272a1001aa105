"""``Mesh``: named axes over a set of devices, wrapping ``jax.sharding.Mesh``.

The wrapper adds what checkpointing asks of a mesh (which devices are this process's,
how many hosts the mesh spans, a value identity that ignores JAX's axis types) and keeps
the JAX mesh one attribute away, so users never have to choose between the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType

from mesh._index import normalize_mesh_axes

__all__ = ["Mesh"]


class Mesh:
    """A named-axis device mesh.

    Args:
        axis_names: the mesh's axis names, major first.
        shape: the size of each axis, same order.
        devices: the devices, either an array already in mesh shape or a flat sequence
            laid out row-major. Default: every device of the job (``jax.devices()``),
            ordered by ``jax.make_mesh`` so the mesh matches what JAX users get.

    Raises:
        ValueError: names and sizes disagree in length, a name repeats, or the device
            count is not the product of the sizes.

    Axes are ``AxisType.Auto``: with JAX's newer ``Explicit`` default, shardings become
    part of array types and plain ``jit`` code that mixes layouts stops compiling.
    """

    def __init__(
        self,
        axis_names: Sequence[str],
        shape: Sequence[int],
        devices: Sequence[jax.Device] | np.ndarray | None = None,
    ):
        if isinstance(axis_names, str):
            axis_names = (axis_names,)
        names, sizes = tuple(axis_names), tuple(shape)
        if len(names) != len(sizes):
            raise ValueError(
                f"Mesh got {len(names)} axis names {names!r} but {len(sizes)} sizes {sizes!r}"
            )
        normalize_mesh_axes(tuple(zip(names, sizes, strict=True)))
        wanted = math.prod(sizes)
        pool = jax.devices() if devices is None else devices
        found = np.asarray(pool, dtype=object).size
        if found != wanted:
            where = "jax.devices()" if devices is None else "the given devices"
            raise ValueError(
                f"Mesh {dict(zip(names, sizes, strict=True))!r} needs {wanted} devices "
                f"(the product of its axis sizes) but {where} holds {found}"
            )
        auto = (AxisType.Auto,) * len(names)
        if devices is None:
            self._jax_mesh = jax.make_mesh(sizes, names, axis_types=auto)
        else:
            grid = np.asarray(devices, dtype=object).reshape(sizes)
            self._jax_mesh = jax.sharding.Mesh(grid, names, axis_types=auto)

    @classmethod
    def create(cls, axes: Mapping[str, int]) -> Mesh:
        """A mesh over all of ``jax.devices()``: ``Mesh.create({"x": 4, "y": 2})``."""
        return cls(tuple(axes), tuple(axes.values()))

    @classmethod
    def from_jax(cls, jax_mesh: jax.sharding.Mesh) -> Mesh:
        """Wrap an existing JAX mesh as is (its device order and axis types kept).

        Raises:
            TypeError: ``jax_mesh`` is not a ``jax.sharding.Mesh``.
        """
        if not isinstance(jax_mesh, jax.sharding.Mesh):
            raise TypeError(f"Mesh.from_jax needs a jax.sharding.Mesh, found {type(jax_mesh)!r}")
        normalize_mesh_axes(tuple(jax_mesh.shape.items()))
        mesh = cls.__new__(cls)
        mesh._jax_mesh = jax_mesh
        return mesh

    @property
    def jax_mesh(self) -> jax.sharding.Mesh:
        """The wrapped ``jax.sharding.Mesh``."""
        return self._jax_mesh

    @property
    def axis_names(self) -> tuple[str, ...]:
        """Axis names, major first."""
        return tuple(self._jax_mesh.axis_names)

    @property
    def shape(self) -> dict[str, int]:
        """Axis name -> size, in mesh order."""
        return dict(zip(self.axis_names, self._jax_mesh.devices.shape, strict=True))

    @property
    def size(self) -> int:
        """Number of devices in the mesh."""
        return int(self._jax_mesh.devices.size)

    @property
    def devices(self) -> np.ndarray:
        """The devices, as an object array of the mesh's shape."""
        return self._jax_mesh.devices

    @property
    def device_process_index(self) -> list[int]:
        """Each device's process index, row-major (what ``process_slices`` takes)."""
        return [int(d.process_index) for d in self._jax_mesh.devices.flat]

    @property
    def local_devices(self) -> list[jax.Device]:
        """This process's devices in the mesh, in mesh order."""
        me = jax.process_index()
        return [d for d in self._jax_mesh.devices.flat if d.process_index == me]

    @property
    def host_count(self) -> int:
        """Number of distinct processes whose devices the mesh spans."""
        return len(set(self.device_process_index))

    def _key(self) -> tuple:
        # Axis types are left out on purpose: they change how jit treats shardings,
        # not which device holds which slice, which is all a checkpoint cares about.
        return (
            self.axis_names,
            tuple(self._jax_mesh.devices.shape),
            tuple((d.platform, d.id) for d in self._jax_mesh.devices.flat),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mesh):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        ids = [d.id for d in self._jax_mesh.devices.flat]
        return f"Mesh({self.shape!r}, device_ids={ids!r})"
