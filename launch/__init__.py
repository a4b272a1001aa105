"""Starting JAX jobs: mpirun + jax.distributed bootstrap and CPU device emulation.

A script started by ``python -m launch -n P --devices-per-process D script.py`` (or by
plain ``mpiexec``) calls :func:`initialize` first thing; a single-process test suite
calls :func:`emulate_cpu_devices` before JAX starts its backend.
"""

from launch._bootstrap import LaunchInfo, initialize, is_mpi_launched, private_mpi_comm
from launch._devices import emulate_cpu_devices

__all__ = [
    "LaunchInfo", "emulate_cpu_devices", "initialize", "is_mpi_launched", "private_mpi_comm",
]
