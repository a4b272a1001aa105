"""``Variable``: a mutable holder of one ``jax.Array`` (TF's ``tf.Variable`` / ``DVariable``).

JAX arrays are immutable, so restoring "in place" needs an object whose contents can be
swapped: a ``Variable`` keeps its shape, dtype and sharding for life, and ``assign``
replaces its value with one placed on that same sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Variable"]


class Variable:
    """A mutable, shaped, typed and sharded holder of one ``jax.Array``.

    Args:
      value: the initial value (``jax.Array``, numpy array or anything ``jnp.asarray``
        accepts). It fixes the variable's shape and dtype.
      layout: optional ``mesh.Layout``; the value is placed with ``layout.to_sharding()``.
        Without it the value keeps its own sharding (a fresh host value lands on JAX's
        default device).

    Example:
      >>> v = Variable(jnp.zeros((4, 2)))
      >>> v.assign(jnp.ones((4, 2)))
      >>> v.shape
      (4, 2)
    """

    def __init__(self, value, layout=None):
        if isinstance(value, Variable):
            value = value.value
        if layout is not None:
            if not isinstance(value, jax.Array):
                value = np.asarray(value)
            value = jax.device_put(value, layout.to_sharding())
        elif not isinstance(value, jax.Array):
            value = jnp.asarray(value)
        self._value = value
        self._layout = layout

    @property
    def value(self) -> jax.Array:
        """The current ``jax.Array``."""
        return self._value

    @property
    def shape(self) -> tuple[int, ...]:
        """The global shape, fixed at construction."""
        return tuple(self._value.shape)

    @property
    def dtype(self) -> np.dtype:
        """The dtype, fixed at construction."""
        return self._value.dtype

    @property
    def sharding(self) -> jax.sharding.Sharding:
        """The sharding every assigned value is placed with."""
        return self._value.sharding

    @property
    def layout(self):
        """The ``mesh.Layout`` of the value, or ``None`` when its sharding has no mesh."""
        if self._layout is not None:
            return self._layout
        sharding = self._value.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            from mesh import Layout

            return Layout.from_sharding(sharding, self._value.ndim)
        return None

    def assign(self, value) -> Variable:
        """Replaces the value, keeping this variable's shape, dtype and sharding.

        Args:
          value: a ``jax.Array``, numpy array, ``Variable`` or Python value. Python values
            are converted to this variable's dtype; arrays must already have it.

        Returns:
          This variable, so calls can be chained.

        Raises:
          ValueError: the shape or (for arrays) the dtype differs.
        """
        if isinstance(value, Variable):
            value = value.value
        if not isinstance(value, jax.Array | np.ndarray | np.generic):
            value = np.asarray(value, dtype=self.dtype)
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"Variable.assign: expected shape {self.shape}, got {tuple(value.shape)}"
            )
        if value.dtype != self.dtype:  # not np.dtype(): typed PRNG keys have no numpy dtype
            raise ValueError(f"Variable.assign: expected dtype {self.dtype}, got {value.dtype}")
        if not (isinstance(value, jax.Array) and value.sharding == self.sharding):
            value = jax.device_put(value, self.sharding)
        self._value = value
        return self

    def numpy(self) -> np.ndarray:
        """The value as a host numpy array (needs every shard addressable)."""
        return np.asarray(self._value)

    def __array__(self, dtype=None, copy=None):
        array = np.asarray(self._value)
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"Variable(shape={self.shape}, dtype={self.dtype}, sharding={self.sharding})"
