"""Mesh and Layout: how a global array maps onto devices and hosts.

``Mesh`` names the axes of a device grid; ``Layout`` says, per array dimension, which
mesh axes split it. The functions below are the pure index math behind ``Layout``
(global shape + specs + mesh axes in, slices out), usable with no devices at all.
"""

from mesh._index import (
    UNSHARDED,
    device_slices,
    process_slices,
    replica_ids,
    shard_shape,
)
from mesh._layout import Layout
from mesh._mesh import Mesh

__all__ = [
    "Mesh",
    "Layout",
    "UNSHARDED",
    "device_slices",
    "replica_ids",
    "process_slices",
    "shard_shape",
]
