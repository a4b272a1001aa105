"""Layout's shard ownership, checked against what JAX itself reports.

Layout asks JAX (``devices_indices_map``) which slice each device holds; these tests
check that delegation: position order, explicit slices, replica numbering and the
replica-0 write rule, on the 8 emulated CPU devices, for all devices (and fake
processes, DCP-style) in one process. The cross-checks compare with
``jax.Array.addressable_shards`` position by position.
"""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from mesh import UNSHARDED, Layout, Mesh, shard_shape

U = UNSHARDED
MESHES = {
    "1x8": {"a": 1, "b": 8},
    "2x4": {"a": 2, "b": 4},
    "4x2": {"a": 4, "b": 2},
    "8x1": {"a": 8, "b": 1},
    "2x2x2": {"a": 2, "b": 2, "c": 2},
}
SHAPE = (8, 16, 8)  # every dimension divisible by 8, the largest product of axes
FAKE_TWO_PROCESSES = [0, 0, 0, 0, 1, 1, 1, 1]  # devices 0-3 on process 0, 4-7 on 1


def _spec_cases(axes, rank):
    """Replicated, partially replicated, fully sharded and tuple-axis specs."""
    names = list(axes)
    cases = [(U,) * rank]
    if rank:
        for i, name in enumerate(names):  # one axis sharded, the others replicate
            specs = [U] * rank
            specs[i % rank] = name
            cases.append(tuple(specs))
        full = [[] for _ in range(rank)]  # every axis used; several share a dim if rank < n
        for i, name in enumerate(names):
            full[i % rank].append(name)
        cases.append(tuple(tuple(f) if len(f) > 1 else (f[0] if f else U) for f in full))
        cases.append((U,) * (rank - 1) + (tuple(reversed(names)),))  # minor axis major
    return list(dict.fromkeys(cases))


CROSS_CASES = [
    pytest.param(axes, SHAPE[:rank], specs, id=f"{mesh_id}-{specs}")
    for mesh_id, axes in MESHES.items()
    for rank in range(4)
    for specs in _spec_cases(axes, rank)
] + [
    pytest.param(MESHES["2x4"], (0, 16), ("a", "b"), id="zero-size-sharded"),
    pytest.param(MESHES["2x2x2"], (4, 0, 2), (("a", "b"), U, "c"), id="zero-size-unsharded"),
]


def _layout(specs, axes) -> Layout:
    """``specs`` over a mesh of ``axes`` on the first emulated devices, row-major."""
    count = int(np.prod(list(axes.values())))
    return Layout(specs, Mesh(tuple(axes), tuple(axes.values()), devices=jax.devices()[:count]))


def device_slices(shape, specs, axes):
    return _layout(specs, axes).device_slices(shape)


def replica_ids(shape, specs, axes):
    return _layout(specs, axes).replica_ids(shape)


def process_slices(shape, specs, axes, device_process_index):
    return _layout(specs, axes).process_slices(shape, device_process_index)


def _normalize(index, shape):
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


@pytest.mark.parametrize("axes,shape,specs", CROSS_CASES)
def test_index_math_matches_jax_addressable_shards(axes, shape, specs):
    mesh = Mesh.create(axes)
    layout = Layout(specs, mesh)
    array = jax.device_put(
        np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape), layout.to_sharding()
    )
    by_device = {shard.device: shard for shard in array.addressable_shards}
    slices = device_slices(shape, specs, axes)
    ids = replica_ids(shape, specs, axes)
    for position, device in enumerate(mesh.devices.flat):
        shard = by_device[device]
        assert slices[position] == _normalize(shard.index, shape)
        assert ids[position] == shard.replica_id
        assert shard_shape(shape, specs, axes) == shard.data.shape
    assert layout.device_slices(shape) == slices
    assert layout.replica_ids(shape) == ids
    assert layout.shard_shape(shape) == array.sharding.shard_shape(shape)
    # One real process: it writes every replica-0 slice.
    assert layout.process_slices(shape) == {
        0: [s for s, r in zip(slices, ids, strict=True) if r == 0]
    }


@pytest.mark.parametrize("axes,shape,specs", CROSS_CASES)
def test_fake_two_processes_write_every_element_exactly_once(axes, shape, specs):
    plan = process_slices(shape, specs, axes, FAKE_TWO_PROCESSES)
    assert set(plan) == {0, 1}
    written = np.zeros(shape, dtype=np.int32)
    for proc, slices in plan.items():
        for index in slices:
            owner = device_slices(shape, specs, axes).index(index)  # first holder = replica 0
            assert FAKE_TWO_PROCESSES[owner] == proc
            written[index] += 1
    assert (written == 1).all()


# Exact tables. Mesh positions are row-major: on {"x": 2, "y": 4}, position p is
# (x, y) = divmod(p, 4).


def test_table_2x4_fully_sharded():
    # dim 0 (size 4) over x: [0,2) [2,4); dim 1 (size 8) over y: [0,2) [2,4) [4,6) [6,8)
    got = device_slices((4, 8), ("x", "y"), {"x": 2, "y": 4})
    assert got == [
        (slice(0, 2), slice(0, 2)),  # (x0, y0)
        (slice(0, 2), slice(2, 4)),  # (x0, y1)
        (slice(0, 2), slice(4, 6)),  # (x0, y2)
        (slice(0, 2), slice(6, 8)),  # (x0, y3)
        (slice(2, 4), slice(0, 2)),  # (x1, y0)
        (slice(2, 4), slice(2, 4)),  # (x1, y1)
        (slice(2, 4), slice(4, 6)),  # (x1, y2)
        (slice(2, 4), slice(6, 8)),  # (x1, y3)
    ]
    assert replica_ids((4, 8), ("x", "y"), {"x": 2, "y": 4}) == [0] * 8
    assert shard_shape((4, 8), ("x", "y"), {"x": 2, "y": 4}) == (2, 2)


def test_table_partially_replicated():
    # dim 0 (size 6) over x only: x0 -> [0,3), x1 -> [3,6); the 4 y positions are copies.
    axes = {"x": 2, "y": 4}
    assert device_slices((6,), ("x",), axes) == [(slice(0, 3),)] * 4 + [(slice(3, 6),)] * 4
    assert replica_ids((6,), ("x",), axes) == [0, 1, 2, 3, 0, 1, 2, 3]
    # Fake processes: x0 lives on process 0, x1 on process 1; each writes its half once.
    assert process_slices((6,), ("x",), axes, FAKE_TWO_PROCESSES) == {
        0: [(slice(0, 3),)],  # [0,3) from position 0
        1: [(slice(3, 6),)],  # [3,6) from position 4
    }


def test_table_replicated_over_the_process_axis():
    # dim 1 (size 8) over y; x positions are copies, so process 0 (x0) writes all of it
    # and process 1 (x1) writes nothing.
    plan = process_slices((2, 8), (U, "y"), {"x": 2, "y": 4}, FAKE_TWO_PROCESSES)
    assert plan == {
        0: [
            (slice(0, 2), slice(0, 2)),  # columns [0,2)
            (slice(0, 2), slice(2, 4)),  # columns [2,4)
            (slice(0, 2), slice(4, 6)),  # columns [4,6)
            (slice(0, 2), slice(6, 8)),  # columns [6,8)
        ],
        1: [],
    }


def test_table_tuple_axes_first_name_major():
    # dim 0 (size 16) over ("y", "x") on {"x": 4, "y": 2}: chunk = y * 4 + x, 2 rows each.
    got = device_slices((16,), (("y", "x"),), {"x": 4, "y": 2})
    starts = [index[0].start for index in got]
    # positions (x0,y0) (x0,y1) (x1,y0) (x1,y1) (x2,y0) (x2,y1) (x3,y0) (x3,y1)
    assert starts == [0, 8, 2, 10, 4, 12, 6, 14]
    assert all(index[0].stop - index[0].start == 2 for index in got)


def test_scalar_and_zero_size():
    assert device_slices((), (), {"x": 2}) == [(), ()]
    assert replica_ids((), (), {"x": 2}) == [0, 1]
    assert shard_shape((), (), {"x": 2}) == ()
    assert process_slices((), (), {"x": 2}, [0, 1]) == {0: [()], 1: []}
    # Every slice of a zero-size dim is [0,0), so JAX numbers all copies as replicas.
    assert device_slices((0,), ("x",), {"x": 2}) == [(slice(0, 0),)] * 2
    assert replica_ids((0,), ("x",), {"x": 2}) == [0, 1]


def test_uneven_dimension_is_refused_like_jax():
    with pytest.raises(ValueError, match=r"dimension 0 .* size 6, .*'x' of size 4 does not evenly"):
        device_slices((6,), ("x",), {"x": 4, "y": 2})
    with pytest.raises(ValueError, match=r"dimension 1 .* size 4, .*\('x', 'y'\) of size 8"):
        shard_shape((8, 4), (U, ("x", "y")), {"x": 4, "y": 2})
    layout = Layout(["x"], Mesh.create({"x": 4, "y": 2}))
    with pytest.raises(ValueError, match="evenly divide"):
        layout.process_slices((6,))
    with pytest.raises(ValueError, match="evenly divide"):  # JAX agrees
        jax.device_put(np.arange(6), layout.to_sharding())


def test_bad_specs_are_refused():
    axes = {"x": 4, "y": 2}
    with pytest.raises(ValueError, match=r"dimension 1 names mesh axis 'z'"):
        device_slices((4, 4), ("x", "z"), axes)
    with pytest.raises(ValueError, match=r"mesh axis 'x' is used twice"):
        device_slices((4, 4), ("x", ("y", "x")), axes)
    with pytest.raises(ValueError, match=r"2 entries but the global shape \(4,\) has rank 1"):
        device_slices((4,), ("x", U), axes)
    with pytest.raises(TypeError, match=r"dimension 0 must be a mesh axis name"):
        device_slices((4,), (3,), axes)
    with pytest.raises(ValueError, match=r"device_process_index has 3 entries .* 8 positions"):
        process_slices((4,), ("x",), axes, [0, 0, 1])


def test_layout_validates_against_its_mesh():
    mesh = Mesh.create({"x": 4, "y": 2})
    with pytest.raises(ValueError, match="names mesh axis 'batch'"):
        Layout(["batch"], mesh)
    with pytest.raises(ValueError, match="mesh axis 'y' is used twice"):
        Layout(["y", "y"], mesh)
    with pytest.raises(TypeError, match="needs a mesh.Mesh"):
        Layout(["x"], mesh.jax_mesh)


def test_constructors_and_canonical_specs():
    mesh = Mesh.create({"x": 4, "y": 2})
    assert Layout.replicated(mesh, 3).sharding_specs == (U, U, U)
    assert Layout.replicated(mesh, 0).rank == 0
    batch = Layout.batch_sharded(mesh, "x", rank=3, axis_dim=1)
    assert batch.sharding_specs == (U, "x", U)
    assert batch.rank == 3 and batch.mesh == mesh
    assert Layout.batch_sharded(mesh, "y", 2, axis_dim=-1).sharding_specs == (U, "y")
    with pytest.raises(ValueError, match="axis_dim 2 is out of range for rank 2"):
        Layout.batch_sharded(mesh, "x", 2, axis_dim=2)
    # None, ("x",) and "x" spell the same layouts.
    assert Layout([None, ("x",)], mesh) == Layout([U, "x"], mesh)
    assert hash(Layout([None, ("x",)], mesh)) == hash(Layout([U, "x"], mesh))
    assert Layout(["x"], mesh) != Layout(["y"], mesh)
    assert Layout(["x"], mesh) != Layout(["x"], Mesh.create({"x": 2, "y": 4}))
    assert repr(Layout([U, ("x", "y")], mesh)).startswith("Layout(['unsharded', ('x', 'y')], mesh=")


def test_sharding_round_trip():
    mesh = Mesh.create({"x": 2, "y": 2, "z": 2})
    for specs in [(U, U), ("x", U), (("z", "x"), "y"), (U, U, "y")]:
        layout = Layout(specs, mesh)
        sharding = layout.to_sharding()
        assert isinstance(sharding, NamedSharding)
        assert sharding.mesh == mesh.jax_mesh
        assert Layout.from_sharding(sharding, layout.rank) == layout
    assert Layout([U, ("z", "x")], mesh).to_partition_spec() == PartitionSpec(None, ("z", "x"))


def test_from_sharding_pads_short_spec_and_refuses_others():
    mesh = Mesh.create({"x": 4, "y": 2})
    short = NamedSharding(mesh.jax_mesh, PartitionSpec("y"))
    assert Layout.from_sharding(short, 3).sharding_specs == ("y", U, U)
    explicit = jax.make_mesh((4, 2), ("x", "y"))  # Explicit axis types still map
    assert Layout.from_sharding(NamedSharding(explicit, PartitionSpec("x")), 1) == Layout(
        ["x"], mesh
    )
    with pytest.raises(TypeError, match="needs a jax.sharding.NamedSharding, found Single"):
        Layout.from_sharding(SingleDeviceSharding(jax.devices()[0]), 1)
    with pytest.raises(ValueError, match="has 2 entries, more than rank 1"):
        Layout.from_sharding(NamedSharding(mesh.jax_mesh, PartitionSpec("x", "y")), 1)
    unconstrained = NamedSharding(mesh.jax_mesh, PartitionSpec(PartitionSpec.UNCONSTRAINED))
    with pytest.raises(ValueError, match="UNCONSTRAINED"):
        Layout.from_sharding(unconstrained, 1)


def test_json_round_trip_has_no_device_ids():
    mesh = Mesh.create({"x": 4, "y": 2})
    layout = Layout([("y", "x"), U, "unsharded"], mesh)
    data = layout.to_json()
    assert data == {
        "sharding_specs": [["y", "x"], "unsharded", "unsharded"],
        "mesh": {"axis_names": ["x", "y"], "shape": [4, 2]},
    }
    assert Layout.from_json(json.loads(json.dumps(data)), mesh) == layout
    # Same axis names and sizes on other devices: the layout carries over.
    reversed_mesh = Mesh(("x", "y"), (4, 2), devices=jax.devices()[::-1])
    assert Layout.from_json(data, reversed_mesh).mesh == reversed_mesh


def test_from_json_errors():
    mesh = Mesh.create({"x": 4, "y": 2})
    data = Layout(["x"], mesh).to_json()
    with pytest.raises(ValueError, match=r"recorded on mesh axes \{'x': 4, 'y': 2\} .* \{'x': 2"):
        Layout.from_json(data, Mesh.create({"x": 2, "y": 4}))
    with pytest.raises(ValueError, match=r"recorded on mesh axes .* \{'y': 2, 'x': 4\}"):
        Layout.from_json(data, Mesh.create({"y": 2, "x": 4}))
    with pytest.raises(ValueError, match="layout JSON must be"):
        Layout.from_json({"sharding_specs": ["x"]}, mesh)
    bad = {"sharding_specs": [7], "mesh": data["mesh"]}
    with pytest.raises(ValueError, match="malformed sharding spec"):
        Layout.from_json(bad, mesh)
    with pytest.raises(ValueError, match="names mesh axis 'q'"):
        Layout.from_json({"sharding_specs": ["q"], "mesh": data["mesh"]}, mesh)


def test_cross_cases_cover_the_requested_grid():
    # The parametrised grid above really spans 5 meshes x ranks 0-3, tuple axes included.
    ids = {(len(p.values[1]), p.values[2]) for p in CROSS_CASES}
    assert {rank for rank, _ in ids} == {0, 1, 2, 3}
    assert any(isinstance(e, tuple) for _, specs in ids for e in specs)
    assert len(CROSS_CASES) > 60
