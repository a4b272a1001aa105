"""Mesh: named axes over the 8 emulated CPU devices, wrapping jax.sharding.Mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mesh import Layout, Mesh


def test_create_over_all_devices_matches_jax_make_mesh():
    mesh = Mesh.create({"x": 4, "y": 2})
    reference = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    assert mesh.axis_names == ("x", "y")
    assert mesh.shape == {"x": 4, "y": 2}
    assert list(mesh.shape) == ["x", "y"]  # dict keeps mesh order
    assert mesh.size == 8
    assert mesh.devices.shape == (4, 2)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in reference.devices.flat]
    assert mesh.jax_mesh == reference
    assert mesh.jax_mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_constructor_equals_create():
    assert Mesh(("x", "y"), (2, 4)) == Mesh.create({"x": 2, "y": 4})
    assert Mesh("x", (8,)).shape == {"x": 8}


def test_single_process_properties():
    mesh = Mesh.create({"a": 2, "b": 2, "c": 2})
    assert mesh.host_count == 1
    assert mesh.local_devices == list(mesh.devices.flat)
    assert mesh.device_process_index == [0] * 8


def test_explicit_devices_keep_the_given_order():
    devices = jax.devices()[::-1]
    mesh = Mesh(("x", "y"), (2, 4), devices=devices)
    assert [d.id for d in mesh.devices.flat] == [7, 6, 5, 4, 3, 2, 1, 0]
    assert mesh.devices[1, 0].id == 3
    # A grid already in mesh shape is taken as is.
    grid = np.array(jax.devices()[:4], dtype=object).reshape(2, 2)
    assert Mesh(("x", "y"), (2, 2), devices=grid).devices[0, 1].id == 1


def test_subset_of_devices():
    mesh = Mesh(("x",), (4,), devices=jax.devices()[4:])
    assert [d.id for d in mesh.devices.flat] == [4, 5, 6, 7]
    assert mesh.size == 4


def test_device_count_must_equal_product_of_shape():
    with pytest.raises(ValueError, match=r"needs 6 devices .* jax.devices\(\) holds 8"):
        Mesh(("x", "y"), (3, 2))
    with pytest.raises(ValueError, match=r"needs 4 devices .* given devices holds 3"):
        Mesh(("x",), (4,), devices=jax.devices()[:3])


def test_bad_axis_names_are_refused():
    with pytest.raises(ValueError, match=r"2 axis names .* 1 sizes"):
        Mesh(("x", "y"), (8,))
    with pytest.raises(ValueError, match=r"distinct strings .* 'x'"):
        Mesh(("x", "x"), (4, 2))
    with pytest.raises(ValueError, match=r"other than 'unsharded'"):
        Mesh(("unsharded",), (8,))
    with pytest.raises(ValueError, match=r"axis 'x' must have a positive int size, found 0"):
        Mesh.create({"x": 0, "y": 8})


def test_from_jax_wraps_as_is_and_equality_ignores_axis_types():
    explicit = jax.make_mesh((2, 4), ("x", "y"))  # jax 0.10 default: Explicit axes
    wrapped = Mesh.from_jax(explicit)
    assert wrapped.jax_mesh is explicit
    assert wrapped == Mesh.create({"x": 2, "y": 4})
    assert hash(wrapped) == hash(Mesh.create({"x": 2, "y": 4}))
    with pytest.raises(TypeError, match="needs a jax.sharding.Mesh, found"):
        Mesh.from_jax("x")


def test_equality_hash_and_repr():
    a = Mesh.create({"x": 4, "y": 2})
    assert a == Mesh.create({"x": 4, "y": 2})
    assert a != Mesh.create({"x": 2, "y": 4})
    assert a != Mesh.create({"p": 4, "q": 2})
    assert a != Mesh(("x", "y"), (4, 2), devices=jax.devices()[::-1])
    assert len({a, Mesh.create({"x": 4, "y": 2}), Mesh.create({"x": 8})}) == 2
    assert a != "mesh"
    assert repr(a) == "Mesh({'x': 4, 'y': 2}, device_ids=[0, 1, 2, 3, 4, 5, 6, 7])"


def test_named_sharding_device_put_and_jit_work_plainly():
    mesh = Mesh.create({"x": 4, "y": 2})
    sharding = NamedSharding(mesh.jax_mesh, PartitionSpec("x", "y"))
    x = jax.device_put(np.arange(32.0).reshape(8, 4), sharding)
    y = jax.device_put(np.ones((8, 4)), Layout.replicated(mesh, 2).to_sharding())
    out = jax.jit(lambda a, b: a * 2 + b)(x, y)
    np.testing.assert_array_equal(np.asarray(out), np.arange(32.0).reshape(8, 4) * 2 + 1)
