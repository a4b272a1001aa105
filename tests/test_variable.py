"""Variable: a mutable holder that keeps its shape, dtype and sharding across assign."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dcheckpoint._variable import Variable
from mesh import Layout, Mesh


def test_value_shape_dtype():
    v = Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert v.shape == (2, 3)
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v.numpy(), np.arange(6).reshape(2, 3))


def test_assign_keeps_sharding():
    jax_mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharding = NamedSharding(jax_mesh, P("x", "y"))
    v = Variable(jax.device_put(jnp.zeros((8, 4)), sharding))
    v.assign(np.ones((8, 4), np.float32))
    assert v.sharding == sharding
    np.testing.assert_array_equal(v.numpy(), np.ones((8, 4)))


def test_assign_python_value_converts_to_dtype():
    v = Variable(jnp.zeros((), jnp.int32))
    v.assign(7)
    assert v.dtype == jnp.int32 and int(v.numpy()) == 7


def test_assign_rejects_shape_and_dtype():
    v = Variable(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"expected shape \(2, 3\), got \(3, 2\)"):
        v.assign(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="expected dtype float32, got int32"):
        v.assign(jnp.zeros((2, 3), jnp.int32))


def test_layout_places_value():
    m = Mesh.from_jax(jax.make_mesh((2, 4), ("a", "b")))
    layout = Layout(["b", Layout.UNSHARDED], m)
    v = Variable(np.arange(16, dtype=np.float32).reshape(8, 2), layout=layout)
    assert v.layout is layout
    assert v.sharding.is_equivalent_to(layout.to_sharding(), 2)
    assert len(v.value.addressable_shards) == 8
    np.testing.assert_array_equal(v.numpy(), np.arange(16).reshape(8, 2))
