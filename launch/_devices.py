"""CPU device emulation: make one process look like a host with n accelerators.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX creates its CPU
client, so the flag only works if it is in the environment before the first call that
touches devices (``jax.devices()``, creating an array, ...). Importing jax is fine.
"""

from __future__ import annotations

import os
import re

__all__ = ["emulate_cpu_devices", "xla_flags_with_device_count"]

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count(=\S*)?")


def xla_flags_with_device_count(xla_flags: str | None, count: int) -> str:
    """Returns ``xla_flags`` with the host device count set to ``count``.

    An existing device-count flag is replaced rather than appended to, so the value does
    not depend on which of two conflicting flags XLA happens to honour.

    Args:
        xla_flags: the current value of ``XLA_FLAGS`` (None or empty for none).
        count: the number of CPU devices each process should see.

    Returns:
        The new ``XLA_FLAGS`` value; other flags are kept in order.
    """
    kept = _DEVICE_COUNT_FLAG.sub("", xla_flags or "").split()
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def emulate_cpu_devices(n: int) -> None:
    """Makes JAX see ``n`` CPU devices in this process.

    Sets ``XLA_FLAGS`` (replacing an earlier device count) and ``JAX_PLATFORMS=cpu``
    when unset. Must run before JAX initialises its backend.

    Args:
        n: number of CPU devices, at least 1.

    Raises:
        ValueError: ``n`` is not a positive integer.
        RuntimeError: JAX's backend is already running with a different device count;
            the flag can no longer take effect.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"emulate_cpu_devices needs a positive device count, got {n!r}")
    running = _running_cpu_device_count()
    if running is not None:
        if running == n:
            return
        raise RuntimeError(
            f"emulate_cpu_devices({n}) was called after JAX initialised its backend with "
            f"{running} CPU device(s); it is too late to change the count in this process. "
            "Call launch.emulate_cpu_devices() before anything touches JAX devices "
            "(jax.devices(), creating arrays), or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} in the environment "
            "before starting Python."
        )
    os.environ["XLA_FLAGS"] = xla_flags_with_device_count(os.environ.get("XLA_FLAGS"), n)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def backends_started() -> bool:
    """Whether JAX has created its backends (after which XLA flags no longer apply).

    JAX has no public way to ask this: every public call that names a backend or a
    device (``jax.devices()``, ``jax.process_count()``, ``jax.extend.backend.backends()``)
    creates the backends first, so it would always answer "yes". This reads
    ``jax._src.xla_bridge``'s own check, the one place this package touches JAX's
    private modules for it.
    """
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _running_cpu_device_count() -> int | None:
    """Returns the CPU backend's local device count, or None if no backend is up yet.

    Asks ``backends_started`` first because ``jax.devices()`` would start the backend
    and make the answer always "too late".
    """
    if not backends_started():
        return None
    import jax.extend.backend

    try:
        return jax.extend.backend.get_backend("cpu").local_device_count()
    except RuntimeError:
        return 0  # backends are up without a CPU one: the flag cannot apply either
