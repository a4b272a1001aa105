"""How one restored array leaf becomes the user's value (used by ``Checkpoint``).

A leaf of the current object graph says what it wants back: an array keeps its shape,
dtype and placement (sharded, host, or uncommitted); a typed PRNG key array keys of
its implementation; a Python scalar its Python type; None whatever was saved.
``leaf_target`` turns that into an engine read target plus a conversion of what the
read returns, and raises a mismatch naming both paths before anything is assigned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dcheckpoint._plan import is_key_array, is_numeric, key_impl_name, python_type
from dcheckpoint.errors import CheckpointMismatchError

__all__ = ["leaf_target"]


def leaf_target(value, meta, ckpt_path: str, cur_path: str, host_target, cast=False):
    """Where an array leaf is read to, and how the read value becomes the new leaf.

    ``value`` is the current object (a Variable's inner value for variables). Arrays
    keep their shape, dtype and sharding (a jax.Array's own; numpy leaves go to
    ``host_target``); Python scalars and strings become whatever the checkpoint holds
    there, read onto the host; a 0-d array receives a saved Python scalar cast to its
    own dtype when the cast is exact (a TrainState's step: an int, or an int32 array).

    Returns:
      ``(engine target, convert, check_early)``: ``convert(read value)`` is the
      restored leaf; ``check_early``: ``convert`` can refuse the saved value (a cast),
      so the caller should try it in its dry run, before anything is assigned.

    Raises:
      CheckpointMismatchError: shape, dtype or PRNG key implementation differ.
    """
    def mismatch(found: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"{cur_path!r}: the object has {found}, the checkpoint holds "
            f"{_describe_saved(meta)} at {ckpt_path!r}"
        )

    if python_type(value) is not None or value is None or isinstance(value, str):
        # None takes whatever was saved (an attribute initialised to None); a scalar or
        # string takes a scalar: a whole array in its place is another model.
        if value is not None and meta.python_type is None and meta.shape != ():
            raise mismatch(f"the Python value {value!r} (a scalar)")
        return None, _to_python(type(value), meta), False
    shape = tuple(value.shape)
    if is_key_array(value) or meta.key_impl is not None:
        impl = key_impl_name(value) if is_key_array(value) else None
        data = jax.eval_shape(jax.random.key_data, value) if impl else value
        if impl != meta.key_impl or tuple(data.shape) != meta.shape:
            raise mismatch(f"shape {shape} dtype {value.dtype}")
        return _array_target(value, host_target), _placed_like(value), False
    dtype = np.dtype(value.dtype)
    if meta.python_type not in (None, "bytes") and shape == ():
        return None, functools.partial(_cast_scalar, value, mismatch), True
    if tuple(meta.shape) != shape or meta.dtype != dtype:
        if not (cast and tuple(meta.shape) == shape and is_numeric(dtype)
                and is_numeric(meta.dtype)):
            hint = " (cast_dtypes=True casts on restore)" if tuple(meta.shape) == shape else ""
            raise mismatch(f"shape {shape} dtype {dtype}{hint}")
        return _cast_target(value, meta, host_target)
    if isinstance(value, np.generic):
        return None, (lambda a: np.asarray(a)[()]), False
    return _array_target(value, host_target), _placed_like(value), False


def _cast_target(value, meta, host_target):
    """Reads the saved dtype where ``value`` lives, then casts it to ``value``'s (on its
    devices for a jax value, on the host for numpy): ``cast_dtypes=True``."""
    target, placed, dtype = _array_target(value, host_target), _placed_like(value), value.dtype
    if isinstance(target, jax.ShapeDtypeStruct):
        target = jax.ShapeDtypeStruct(target.shape, meta.dtype, sharding=target.sharding)
    if isinstance(value, np.generic):
        return target, (lambda a: np.asarray(a).astype(dtype)[()]), False
    return target, (lambda a: placed(a).astype(dtype)), False


def _array_target(value, host_target):
    """A jax.Array's own sharding; an abstract target as it is; the host target for
    numpy values.

    An uncommitted jax.Array (``jnp.zeros``, an optax count) is read to the host and
    comes back uncommitted (see ``_placed_like``), so jit may still move it next to
    the sharded arrays it meets, as it could before the restore.
    """
    if isinstance(value, jax.Array):
        return value.sharding if value.committed else None
    if isinstance(value, jax.ShapeDtypeStruct):
        return value  # onto its sharding; without one, a jax.Array (see finish_read)
    return host_target


def _placed_like(value):
    """Converts a read value to the placement kind of ``value``: uncommitted stays so."""
    if isinstance(value, jax.Array) and not value.committed:
        return lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a)
    return lambda a: a


def _to_python(current: type, meta):
    """Converts a read value for a Python-scalar object: the saved Python type wins."""
    def convert(array):
        if meta.python_type is not None or current in (type(None), str, bytes):
            return array  # finish_read made it the saved Python type (or it is an array)
        return np.asarray(array).item()
    return convert


def _cast_scalar(value, mismatch, saved):
    """A saved Python scalar placed as the 0-d array ``value`` is, if exactly equal."""
    dtype = np.dtype(value.dtype)
    try:
        cast = np.asarray(saved, dtype=dtype)
    except (OverflowError, ValueError, TypeError):
        raise mismatch(f"dtype {dtype}, which cannot hold {saved!r}") from None
    rounded = isinstance(saved, float) and np.issubdtype(dtype, np.floating)
    if not rounded and cast.item() != saved:  # a float rounds; an int must fit exactly
        raise mismatch(f"dtype {np.dtype(value.dtype)}, which cannot hold {saved!r}")
    if isinstance(value, jax.Array):
        return jax.device_put(cast, value.sharding) if value.committed else jnp.asarray(cast)
    return cast[()] if isinstance(value, np.generic) else cast


def _describe_saved(meta) -> str:
    if meta.key_impl is not None:
        return f"{meta.key_impl} PRNG key data of shape {tuple(meta.shape)}"
    if meta.python_type is not None:
        return f"a Python {meta.python_type}"
    return f"shape {tuple(meta.shape)} dtype {meta.dtype}"
