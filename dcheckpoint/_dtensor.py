"""``DTensorCheckpoint``: a ``Checkpoint`` bound to one mesh (TF's ``DTensorCheckpoint``)."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from dcheckpoint._checkpoint import Checkpoint
from mesh import Mesh

__all__ = ["DTensorCheckpoint"]


class DTensorCheckpoint(Checkpoint):
    """A ``Checkpoint`` whose arrays are laid out on ``mesh``.

    Everything ``Checkpoint`` does works the same. Arrays are saved with their layouts
    (the engine records each array's sharding). Restoring into ``Variable``s whose
    layout lives on another mesh (another shape, device count or process count)
    reshards: each value is read straight into the variable's own sharding. Values
    restored with no sharding of their own (numpy leaves of a rebuilt pytree) are
    placed on ``mesh``, replicated.

    Args:
      mesh: a ``mesh.Mesh`` or ``jax.sharding.Mesh``.
      root: as for ``Checkpoint``.
      **kwargs: as for ``Checkpoint``.

    Example:
      >>> m = Mesh.from_jax(jax.make_mesh((4, 2), ("x", "y")))
      >>> w = Variable(np.zeros((8, 4)), layout=Layout(["x", "y"], m))
      >>> DTensorCheckpoint(m, w=w).save("/ckpt/run")   # restore on any other mesh
    """

    def __init__(self, mesh: Mesh | jax.sharding.Mesh, root: Any = None, **kwargs: Any) -> None:
        jax_mesh = getattr(mesh, "jax_mesh", mesh)
        if not isinstance(jax_mesh, jax.sharding.Mesh):
            raise ValueError(
                f"DTensorCheckpoint needs a mesh.Mesh or jax.sharding.Mesh, "
                f"got {type(mesh).__name__}"
            )
        object.__setattr__(self, "_dc_mesh", mesh)
        object.__setattr__(self, "_dc_jax_mesh", jax_mesh)
        super().__init__(root, **kwargs)

    @property
    def mesh(self) -> Mesh | jax.sharding.Mesh:
        """The mesh this checkpoint lays values out on."""
        return self._dc_mesh

    def _dc_host_target(self):
        """Values with no sharding of their own go onto the mesh, replicated."""
        return NamedSharding(self._dc_jax_mesh, PartitionSpec())
