"""The storage engine in one process on 8 emulated CPU devices: round trips on many
layouts and dtypes, the on-disk format read by plain Zarr tools, corruption, crashes."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint import _engine
from tests.ckpt_files import array_dir

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64", "complex64"]


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _values(shape, dtype):
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    flat = np.arange(int(np.prod(shape)), dtype=np.int64)
    if dtype == np.bool_:
        return (flat % 3 == 0).reshape(shape)
    if np.issubdtype(dtype, np.complexfloating):
        return (flat + 1j * flat[::-1]).astype(dtype).reshape(shape)
    return (flat % 100).astype(dtype).reshape(shape)


def _put(values, sharding):
    return jax.make_array_from_callback(values.shape, sharding, lambda idx: values[idx])


def _assert_same(restored, expected):
    assert restored.dtype == expected.dtype
    # Compare bytes, so -0.0 vs 0.0 or NaN payloads would count as differences.
    assert np.asarray(restored).tobytes() == np.asarray(expected).tobytes()
    assert np.shape(restored) == np.shape(expected)


MESH_42 = [(4, 2), ("x", "y")]
LAYOUTS = {
    "replicated": P(),
    "rows": P("x"),
    "rows_cols": P("x", "y"),
    "cols": P(None, "y"),
    "flattened_axes": P(("x", "y")),
    "transposed": P("y", "x"),
}


@pytest.mark.parametrize("spec", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_round_trip_same_layout_is_bit_identical(tmp_path, spec):
    mesh = _mesh(*MESH_42)
    sharding = NamedSharding(mesh, spec)
    values = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    array = _put(values, sharding)
    path = dcheckpoint.save_pytree(str(tmp_path / "ckpt"), {"w": array})
    restored = dcheckpoint.restore_pytree(path, {"w": array})["w"]
    assert restored.sharding == sharding
    _assert_same(restored, values)
    for shard in restored.addressable_shards:
        _assert_same(shard.data, values[shard.index])


@pytest.fixture(autouse=True)
def _x64():
    """64-bit dtypes are part of the contract; JAX drops them to 32 bits by default."""
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips(tmp_path, dtype):
    sharding = NamedSharding(_mesh(*MESH_42), P("x"))
    values = _values((8, 3), dtype)
    tree = {"sharded": _put(values, sharding), "host": values, "scalar": values[0, 0]}
    dcheckpoint.save_pytree(str(tmp_path / "c"), tree)
    restored = dcheckpoint.restore_pytree(str(tmp_path / "c"), {
        "sharded": sharding, "host": None, "scalar": None})
    _assert_same(restored["sharded"], values)
    _assert_same(restored["host"], values)
    _assert_same(restored["scalar"], values[0, 0])
    assert restored["scalar"].shape == ()


def test_scalar_and_zero_size_arrays(tmp_path):
    mesh = _mesh(*MESH_42)
    scalar = jax.device_put(jnp.float32(2.5), NamedSharding(mesh, P()))
    empty = jax.device_put(jnp.zeros((0, 4), jnp.int32), NamedSharding(mesh, P(None, "y")))
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"s": scalar, "e": empty})
    out = dcheckpoint.restore_pytree(str(tmp_path / "c"), {"s": scalar, "e": empty})
    assert float(out["s"]) == 2.5 and out["s"].shape == ()
    assert out["e"].shape == (0, 4) and out["e"].dtype == jnp.int32
    assert out["e"].sharding == empty.sharding


RESHARD_TARGETS = {
    "mesh_2x4_rows": ((2, 4), ("a", "b"), P("a")),
    "mesh_2x4_cols": ((2, 4), ("a", "b"), P(None, "b")),
    "mesh_8x1": ((8, 1), ("a", "b"), P("a", "b")),
    "replicated": ((2, 4), ("a", "b"), P()),
    "partial": ((2, 2, 2), ("a", "b", "c"), P("c", "a")),
}


@pytest.mark.parametrize("target", RESHARD_TARGETS.values(), ids=RESHARD_TARGETS.keys())
def test_restore_onto_another_mesh(tmp_path, target):
    values = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    saved = _put(values, NamedSharding(_mesh(*MESH_42), P("x", "y")))
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": saved})
    shape, names, spec = target
    sharding = NamedSharding(_mesh(shape, names), spec)
    restored = dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": sharding})["w"]
    assert restored.sharding == sharding
    for shard in restored.addressable_shards:
        _assert_same(shard.data, values[shard.index])


def test_restore_onto_single_device_and_host(tmp_path):
    values = np.arange(32, dtype=np.int64).reshape(4, 8)
    saved = _put(values, NamedSharding(_mesh(*MESH_42), P("x", "y")))
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": saved})
    device = jax.devices()[5]
    out = dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": SingleDeviceSharding(device)})
    assert out["w"].devices() == {device}
    _assert_same(out["w"], values)
    host = dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": None})["w"]
    assert isinstance(host, np.ndarray)
    _assert_same(host, values)


def test_chunks_follow_shards_and_only_replica_zero_is_written(tmp_path):
    sharding = NamedSharding(_mesh(*MESH_42), P("x"))  # 4 shards, each on 2 devices
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": _put(np.ones((8, 6)), sharding)})
    array = array_dir(tmp_path / "c", "w")
    chunk_files = sorted(
        os.path.relpath(os.path.join(d, f), array)
        for d, _, files in os.walk(array) for f in files if f != "zarr.json"
    )
    # rows [0,2) [2,4) [4,6) [6,8): one chunk file each, not one per device.
    assert chunk_files == ["c/0/0", "c/1/0", "c/2/0", "c/3/0"]
    meta = dcheckpoint.read_metadata(str(tmp_path / "c"))
    assert meta.arrays["w"].chunk_shape == (2, 6)
    assert meta.arrays["w"].layout == {
        "mesh": {"axis_names": ["x", "y"], "shape": [4, 2]},
        "sharding_specs": ["x", "unsharded"],
    }


def test_arrays_open_with_zarr_and_tensorstore_alone(tmp_path):
    sharding = NamedSharding(_mesh(*MESH_42), P("x", "y"))
    values = {dt: _values((8, 4), dt) for dt in DTYPES}
    tree = {"model": {dt: _put(v, sharding) for dt, v in values.items()}}
    dcheckpoint.save_pytree(str(tmp_path / "c"), tree)
    # The recipe of docs/FORMAT.md: the metadata (plain JSON) names each array's directory.
    doc = json.loads((tmp_path / "c" / "dcheckpoint.json").read_text())
    for dt, v in values.items():
        path = str(tmp_path / "c" / doc["checkpoint"]["arrays"][f"model/{dt}"]["storage_path"])
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
        _assert_same(ts.open(spec).result().read().result(), v)
        if dt != "bfloat16":  # bfloat16 is TensorStore's extension to Zarr v3
            _assert_same(zarr.open_array(path, mode="r")[...], v)
    # Zarr tools walk the tree from the checkpoint's root: one data directory, then paths.
    root = zarr.open_group(str(tmp_path / "c"), mode="r")
    (data_dir,) = [name for name, _ in root.groups()]
    assert data_dir.startswith("data-")
    assert root[data_dir]["model"]["float32"].shape == (8, 4)


def test_compression_round_trips(tmp_path):
    values = np.zeros((64, 64), np.float32)
    options = dcheckpoint.CheckpointOptions(compression="zstd")
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": values}, options=options)
    size = os.path.getsize(array_dir(tmp_path / "c", "w") / "c" / "0" / "0")
    assert size < values.nbytes / 10
    _assert_same(dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": None})["w"], values)


def test_flipped_byte_in_chunk_names_the_array(tmp_path):
    sharding = NamedSharding(_mesh(*MESH_42), P("x"))
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"layer": {"w": _put(np.ones((8, 4)), sharding)}})
    chunk = array_dir(tmp_path / "c", "layer/w") / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match="'layer/w'.*checksum"):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"layer": {"w": sharding}})


def test_missing_chunk_is_an_error_not_zeros(tmp_path):
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": np.zeros((4,), np.int32)})
    os.remove(array_dir(tmp_path / "c", "w") / "c" / "0")
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match="'w'.*missing"):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": None})


def test_directory_without_metadata_is_not_a_checkpoint(tmp_path):
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": np.ones(3)})
    assert _engine.is_committed(str(tmp_path / "c"))
    os.remove(tmp_path / "c" / "dcheckpoint.json")  # what a crash before the commit leaves
    assert not _engine.is_committed(str(tmp_path / "c"))
    found = r"holds \[.data-.*neither dcheckpoint.s dcheckpoint.json nor Orbax.s _METADATA"
    with pytest.raises(dcheckpoint.CheckpointNotFoundError, match=found):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": None})
    with pytest.raises(FileNotFoundError, match="no such directory"):
        dcheckpoint.read_metadata(str(tmp_path / "nothing"))


def test_shape_and_dtype_mismatch_name_the_array(tmp_path):
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": np.ones((4, 2), np.float32)})
    with pytest.raises(dcheckpoint.CheckpointMismatchError,
                       match=r"'w'.*shape \(2, 4\).*holds shape \(4, 2\)"):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": np.ones((2, 4), np.float32)})
    with pytest.raises(ValueError, match="'w'.*dtype int32.*holds float32"):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": np.ones((4, 2), np.int32)})
    with pytest.raises(dcheckpoint.CheckpointMismatchError, match="no arrays \\['v'\\]"):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"v": None})


def test_overwrite_replaces_atomically(tmp_path):
    path = str(tmp_path / "c")
    dcheckpoint.save_pytree(path, {"w": np.full(3, 1)})
    dcheckpoint.save_pytree(path, {"w": np.full(3, 2), "v": np.ones(1)})
    out = dcheckpoint.restore_pytree(path, {"w": None, "v": None})
    np.testing.assert_array_equal(out["w"], [2, 2, 2])
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no staging or replaced copies left


def test_failed_save_leaves_previous_checkpoint_and_no_staging(tmp_path):
    path = str(tmp_path / "c")
    dcheckpoint.save_pytree(path, {"w": np.full(3, 1)})
    with pytest.raises(ValueError, match="'bad'.*dtype"):
        dcheckpoint.save_pytree(path, {"w": np.full(3, 2), "bad": np.array(["text"])})
    np.testing.assert_array_equal(dcheckpoint.restore_pytree(path, {"w": None})["w"], [1, 1, 1])
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_reads_spanning_chunks_split_at_chunk_boundaries():
    from dcheckpoint._engine import _chunk_pieces

    # rows [3, 7) over chunks of 2 rows: [3,4) [4,6) [6,7), at offsets 0, 1 and 3.
    assert _chunk_pieces((slice(3, 7),), (2,)) == [
        ((slice(3, 4),), (slice(0, 1),)),
        ((slice(4, 6),), (slice(1, 3),)),
        ((slice(6, 7),), (slice(3, 4),)),
    ]
    # a (4, 8) read over (2, 4) chunks: four pieces, row-major.
    pieces = _chunk_pieces((slice(0, 4), slice(0, 8)), (2, 4))
    assert [p for p, _ in pieces] == [
        (slice(0, 2), slice(0, 4)), (slice(0, 2), slice(4, 8)),
        (slice(2, 4), slice(0, 4)), (slice(2, 4), slice(4, 8)),
    ]
    assert _chunk_pieces((), ()) == [((), ())]  # a scalar is one piece
    assert _chunk_pieces((slice(0, 0), slice(0, 4)), (1, 4)) == []  # zero-size: none
