"""Mesh and Layout: how a global array maps onto devices and hosts.

``Mesh`` names the axes of a device grid; ``Layout`` says, per array dimension, which
mesh axes split it. Which slice each device holds is JAX's answer
(``NamedSharding.devices_indices_map``): ``Layout`` asks JAX, as the checkpoint engine's
plans do, so shard ownership has one source of truth. ``shard_shape`` checks a layout
against a shape without devices.
"""

from mesh._index import UNSHARDED, shard_shape
from mesh._layout import Layout
from mesh._mesh import Mesh

__all__ = [
    "Mesh",
    "Layout",
    "UNSHARDED",
    "shard_shape",
]
