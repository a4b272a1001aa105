"""Packed small arrays: round trips onto other meshes and process counts, the files on
disk, the documented recipe with plain Zarr tools, corruption naming the array, and
hostile packed tables."""

import json
import math
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint import _engine, _packing
from dcheckpoint._metadata import _digest
from dcheckpoint._verify import chunk_count, verify
from tests.ckpt_files import array_dir
from tests.mp_util import REPO_ROOT, results, run_launch, save_with_two_processes

WORKER = REPO_ROOT / "tests" / "workers" / "packing_worker.py"


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _values(n=70):
    """n small arrays of several dtypes and ranks, a scalar, and one large array."""
    dtypes = ["float32", "int8", "bool", "bfloat16", "complex64", "uint16", "float64"]
    out = {}
    for i in range(n):
        dtype = np.dtype(ml_dtypes.bfloat16) if dtypes[i % 7] == "bfloat16" else \
            np.dtype(dtypes[i % 7])
        shape = [(3,), (2, 5), (4, 4, 2)][i % 3]
        flat = np.arange(math.prod(shape)) * (i + 1) % 97
        out[f"layer{i // 10}/p{i % 10}"] = (flat % 2 == 0 if dtype == np.bool_ else
                                            flat.astype(dtype)).reshape(shape)
    out["step"] = np.int64(12345)
    out["big"] = np.arange(100_000, dtype=np.float32)  # 400 KB: its own Zarr array
    return out


def _put(values, sharding):
    return jax.make_array_from_callback(values.shape, sharding, lambda i: values[i])


def _same(got, want):
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == np.asarray(want).tobytes()


@pytest.fixture
def saved(tmp_path):
    """Host values plus small sharded jax.Arrays (several chunks each) on a 4x2 mesh."""
    mesh = _mesh((4, 2), ("x", "y"))
    values = _values()
    tree = dict(values)
    for i in range(4):
        v = (np.arange(48, dtype=np.float32) * (i + 2)).reshape(8, 6)
        values[f"sharded/{i}"] = v
        tree[f"sharded/{i}"] = _put(v, NamedSharding(mesh, [P("x", "y"), P("x"), P(None, "y"),
                                                            P()][i]))
    path = str(tmp_path / "ckpt")
    _engine.save_arrays(path, tree)
    return path, values


def _data_dir(path) -> str:
    """The save's own data directory (``data-<save id>``), from the metadata."""
    return array_dir(path, "big" if "big" in dcheckpoint.read_metadata(str(path)).arrays
                     else next(iter(dcheckpoint.read_metadata(str(path)).arrays))
                     ).relative_to(path).parts[0]


def test_small_arrays_are_packed_into_a_few_files(saved):
    path, values = saved
    meta = dcheckpoint.read_metadata(path)
    data = _data_dir(path)  # the save's data-<id>/, beside its arrays
    assert meta.packed.root() == f"{data}/_packed"
    files = sorted(os.path.relpath(os.path.join(d, f), path)
                   for d, _, fs in os.walk(path) for f in fs)
    packed = [f for f in files if f.startswith(f"{data}/_packed/")]
    others = [f for f in files if not f.startswith(f"{data}/_packed/")]
    # One packed Zarr array per dtype for this process, each one chunk file + zarr.json.
    assert sorted({f.split("/")[3] for f in packed if f.count("/") > 3}) == sorted(
        {"float32", "int8", "bool", "bfloat16", "complex64", "uint16", "float64", "int64"})
    assert len(packed) == 2 + 8 * 2
    assert others == [f"{data}/big/c/0", f"{data}/big/zarr.json", f"{data}/zarr.json",
                      "dcheckpoint.json", "zarr.json"]
    assert not meta.packed.holds("big")
    assert all(meta.packed.holds(p) for p in values if p != "big")
    # A sharded small array keeps its chunks: 4 x 2 of them, each stored once.
    assert sorted(m.chunk for m in meta.packed.members["sharded/0"]) == [
        (i, j) for i in range(4) for j in range(2)]
    # Every chunk starts on a 64-byte boundary, so CPU devices adopt restored views.
    for members in meta.packed.members.values():
        for m in members:
            assert m.offset * meta.packed.arrays[m.packed].dtype.itemsize % 64 == 0, m


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded (older saves)"])
def test_pieces_that_cut_through_arrays_restore_bit_identically(tmp_path, monkeypatch,
                                                                padded):
    # 16 MB packed per dtype, read in 1 MiB pieces: most arrays cross a piece boundary.
    # Unpadded offsets (as saved before padding) leave views unaligned: they are copied.
    if not padded:
        def contiguous(items, dtype):
            sizes = [math.prod(s.stop - s.start for s in i.index) for i in items]
            return [sum(sizes[:k]) for k in range(len(sizes))], sum(sizes)
        monkeypatch.setattr(_packing, "_layout", contiguous)
    monkeypatch.setattr(_packing, "_PIECE_BYTES", 1 << 20)
    mesh = _mesh((4, 2), ("x", "y"))
    values = {f"f/{i}": np.arange(50_000 + 8 * i + 1, dtype=np.float32) * (i + 1)
              for i in range(80)}
    values.update({f"h/{i}": (np.arange(60_000 + i) % 251).astype(np.int16)
                   for i in range(40)})
    values["s/0"] = np.arange(64 * 600, dtype=np.float32).reshape(64, 600)
    path = str(tmp_path / "ckpt")
    _engine.save_arrays(path, {**values, "s/0": _put(values["s/0"],
                                                     NamedSharding(mesh, P("x", "y")))})
    meta = dcheckpoint.read_metadata(path)
    assert all(meta.packed.holds(p) for p in values)
    assert not padded or all(m.offset % 16 == 0 for m in meta.packed.members["f/3"])
    host = _engine.restore_arrays(path, dict.fromkeys(values))
    targets = {p: NamedSharding(mesh, P()) for p in values}  # replicated: one read each
    targets["h/2"] = SingleDeviceSharding(jax.devices()[3])
    targets["s/0"] = NamedSharding(mesh, P("y", "x"))  # across the saved chunks
    out = _engine.restore_arrays(path, targets)
    for name, want in values.items():
        _same(host[name], want)
        _same(out[name], want)
        assert out[name].sharding == targets[name]
        for shard in out[name].addressable_shards:
            assert np.asarray(shard.data).tobytes() == want[shard.index].tobytes()


def test_round_trip_onto_other_meshes_host_and_one_device(saved):
    path, values = saved
    host = _engine.restore_arrays(path, dict.fromkeys(values))
    for name, want in values.items():
        _same(host[name], want)
    mesh = _mesh((2, 4), ("a", "b"))
    # 64-bit values would become 32-bit on devices (jax_enable_x64 is off): host only.
    values = {n: v for n, v in values.items()
              if v.dtype.itemsize < 8 or v.dtype == np.complex64}
    targets = {name: NamedSharding(mesh, P("a") if v.ndim and v.shape[0] % 2 == 0 else P())
               for name, v in values.items()}
    targets["sharded/0"] = NamedSharding(mesh, P("b", "a"))  # crosses saved chunks
    targets["sharded/1"] = SingleDeviceSharding(jax.devices()[5])
    # A host memory kind is kept, replicated or sharded (each shard put into it).
    targets["sharded/2"] = NamedSharding(mesh, P("a"), memory_kind="pinned_host")
    targets["sharded/3"] = NamedSharding(mesh, P(), memory_kind="pinned_host")
    out = _engine.restore_arrays(path, targets)
    for name, want in values.items():
        _same(out[name], want)
        assert out[name].sharding == targets[name]
        for shard in out[name].addressable_shards:
            assert np.asarray(shard.data).tobytes() == want[shard.index].tobytes()


def test_fewer_small_arrays_than_the_minimum_are_not_packed(tmp_path):
    values = {f"a{i}": np.arange(i + 1) for i in range(_packing.PACK_MIN_ARRAYS - 1)}
    _engine.save_arrays(str(tmp_path / "c"), values)
    assert dcheckpoint.read_metadata(str(tmp_path / "c")).packed is None
    assert not os.path.exists(tmp_path / "c" / _data_dir(tmp_path / "c") / "_packed")
    opts = dcheckpoint.CheckpointOptions(pack_below_bytes=0)
    _engine.save_arrays(str(tmp_path / "d"), _values(), options=opts)
    assert dcheckpoint.read_metadata(str(tmp_path / "d")).packed is None


def test_a_user_array_named_like_the_packed_root_moves_the_root(tmp_path):
    values = _values()
    values["_packed/p0/float32"] = np.arange(3, dtype=np.float32)
    _engine.save_arrays(str(tmp_path / "c"), values)
    meta = dcheckpoint.read_metadata(str(tmp_path / "c"))
    assert meta.packed.root() == f"{_data_dir(tmp_path / 'c')}/_packed_1"
    out = _engine.restore_arrays(str(tmp_path / "c"), dict.fromkeys(values))
    for name, want in values.items():
        _same(out[name], want)


def _recipe(path: str, read_flat) -> dict[str, np.ndarray]:
    """docs/FORMAT.md's recipe: every packed array, without dcheckpoint."""
    body = json.load(open(os.path.join(path, "dcheckpoint.json")))["checkpoint"]
    arrays = {}
    for name, packed in body.get("packed", {}).items():
        flat = read_flat(os.path.join(path, name))  # one read per packed file
        for array_path, offset, chunk in packed["members"]:
            entry = body["arrays"][array_path]
            shape, chunk_shape = entry["shape"], entry["chunk_shape"]
            value = arrays.setdefault(array_path, np.empty(shape, flat.dtype))
            start = [i * c for i, c in zip(chunk, chunk_shape, strict=True)]
            extent = [min(c, s - b) for c, s, b in zip(chunk_shape, shape, start, strict=True)]
            where = tuple(slice(b, b + e) for b, e in zip(start, extent, strict=True))
            value[where] = flat[offset:offset + math.prod(extent)].reshape(extent)
    return arrays


def test_packed_arrays_read_by_the_documented_recipe_with_zarr_or_tensorstore(saved):
    path, values = saved

    def with_tensorstore(p):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": p}}
        return ts.open(spec).result().read().result()

    def with_zarr(p):
        if p.endswith("bfloat16"):  # TensorStore's extension: zarr-python has no bfloat16
            return with_tensorstore(p)
        return zarr.open_array(p, mode="r")[...]

    for read in (with_tensorstore, with_zarr):
        restored = _recipe(path, read)
        assert sorted(restored) == sorted(n for n in values if n != "big")
        for name, value in restored.items():
            _same(value, values[name])


def _flip(file: str, at: int) -> None:
    data = bytearray(open(file, "rb").read())
    data[at] ^= 0x10
    open(file, "wb").write(bytes(data))


def test_corruption_inside_a_packed_file_names_the_array(saved):
    path, _ = saved
    meta = dcheckpoint.read_metadata(path)
    member = meta.packed.members["layer3/p4"][0]  # int8? whatever dtype: its own file
    file = os.path.join(path, member.packed, "c", "0")
    itemsize = meta.packed.arrays[member.packed].dtype.itemsize
    _flip(file, member.offset * itemsize)
    holders = sorted(p for p, ms in meta.packed.members.items()
                     if ms[0].packed == member.packed)
    with pytest.raises(dcheckpoint.CorruptCheckpointError,
                       match=r"'layer3/p4'.*checksum.*holds arrays"):
        _engine.restore_arrays(path, {"layer3/p4": None})
    report = verify(path)
    assert not report.ok
    assert [p.file for p in report.problems] == [f"{member.packed}/c/0"]
    named = report.problems[0].array
    assert named in holders and "checksum" in report.problems[0].message
    assert "layer3/p4" in report.problems[0].message or len(holders) > 5
    # Arrays in other packed files still restore.
    other = next(p for p, ms in meta.packed.members.items() if ms[0].packed != member.packed)
    _engine.restore_arrays(path, {other: None})


def test_missing_packed_file_is_an_error_naming_arrays(saved):
    path, _ = saved
    meta = dcheckpoint.read_metadata(path)
    member = meta.packed.members["step"][0]
    os.remove(os.path.join(path, member.packed, "c", "0"))
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match=r"'step'.*missing"):
        _engine.restore_arrays(path, {"step": None})
    problems = verify(path).problems
    assert [(p.array, p.file) for p in problems] == [("step", f"{member.packed}/c/0")]


def test_verify_passes_and_counts_every_chunk_once(saved):
    path, values = saved
    meta = dcheckpoint.read_metadata(path)
    counted = []
    report = verify(path, progress=counted.append)
    assert report.ok and report.arrays_checked == len(values)
    assert sum(counted) == chunk_count(meta)
    assert report.chunks_checked == len(meta.packed.arrays) + 1  # + big's one chunk


def _edit_packed(path, edit):
    file = os.path.join(path, "dcheckpoint.json")
    doc = json.load(open(file))
    edit(doc["checkpoint"]["packed"])
    doc["sha256"] = _digest(doc["checkpoint"])  # a hostile writer can sign too
    json.dump(doc, open(file, "w"))


def _first(packed):
    return next(v for k, v in packed.items() if k.endswith("float32"))


@pytest.mark.parametrize("edit, message", [
    (lambda p: _first(p)["members"][1].__setitem__(1, 0), "malformed member"),
    (lambda p: _first(p).__setitem__("size", 2), "ends past the end"),
    (lambda p: _first(p)["members"].append(["big", 10**6, [0]]),
     "malformed member|packed into|past the end"),
    (lambda p: _first(p)["members"][0].__setitem__(2, [7]), "malformed member"),
    (lambda p: _first(p)["members"].remove(
        next(m for m in _first(p)["members"] if m[0] == "sharded/0")), "chunks stored, expected"),
    (lambda p: p.__setitem__("../escape/float32", p.pop(next(iter(p)))), "leave the checkpoint"),
    (lambda p: p.__setitem__("big/x/float32", p.pop(next(iter(p)))),
     "inside the packed root|several roots"),
    (lambda p: _first(p).__setitem__("dtype", "int32"), "packed into"),
], ids=["overlap", "past_end", "foreign_array", "chunk_outside_grid", "chunk_missing",
        "escape", "inside_array", "dtype"])
def test_hostile_packed_tables_are_refused(saved, edit, message):
    path, _ = saved
    _edit_packed(path, edit)
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match=message):
        dcheckpoint.read_metadata(path)
    assert not verify(path).ok


@pytest.mark.parametrize("chunk_size, restored, message", [
    (2**36, "first", r"packed/p0/float32.*declares chunks of \[68719476736\]"),
    (2**18, "first", r"packed/p0/float32.*only 1 chunk files exist"),
    (2**18, "last", r"needs 274877889280 bytes in one piece")],
    ids=["one_huge_chunk", "huge_grid", "huge_member"])
def test_a_crafted_huge_packed_file_is_refused_before_reading(tmp_path, chunk_size, restored,
                                                             message):
    """A signed table may claim a packed file of 2**36 elements and a member array that
    fills it; a restore of that member or of any other in the file must refuse it from
    the declared sizes and the chunk files that exist, before TensorStore allocates (a
    failed C++ allocation aborts the process)."""
    path = str(tmp_path / "ckpt")
    dcheckpoint.save_pytree(path, {f"a{i}": np.arange(64, dtype=np.float32) for i in range(70)})
    file = os.path.join(path, "dcheckpoint.json")
    doc = json.load(open(file))
    packed = doc["checkpoint"]["packed"]
    name = next(k for k in packed if k.endswith("float32"))
    packed[name].update(size=2**36, chunk_size=chunk_size)
    array, offset, _ = packed[name]["members"][-1]
    meta = doc["checkpoint"]["arrays"][array]
    meta["shape"] = meta["chunk_shape"] = [2**36 - offset]
    doc["sha256"] = _digest(doc["checkpoint"])
    json.dump(doc, open(file, "w"))
    wanted = array if restored == "last" else packed[name]["members"][0][0]
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match=message):
        dcheckpoint.restore_pytree(path, {wanted: None})


def test_processes_packing_with_different_limits_is_a_coordination_error(tmp_path):
    values = _values()
    plan = _engine.plan_save(values, is_coordinator=True)
    reports = [{"packed": _packing.Packer(plan, 0, limit).report()} for limit in (1024, 0)]
    with pytest.raises(dcheckpoint.CoordinationError, match="pack_below_bytes"):
        _packing.table_from_reports(plan, reports)


@pytest.fixture(scope="module")
def saved_by_two(tmp_path_factory):
    return save_with_two_processes(WORKER, str(tmp_path_factory.mktemp("pack") / "ckpt"))


def test_two_processes_each_pack_their_own_shards(saved_by_two):
    meta = dcheckpoint.read_metadata(saved_by_two)
    assert sorted({name.split("/")[-2] for name in meta.packed.arrays}) == ["p0", "p1"]
    # grid arrays are (4, 6) on 4 x 2 devices: 8 chunks, 4 written by each process.
    writers = sorted(m.packed.split("/")[-2] for m in meta.packed.members["grid0"])
    assert writers == ["p0"] * 4 + ["p1"] * 4
    assert not meta.packed.holds("big") and verify(saved_by_two).ok


@pytest.mark.parametrize(("processes", "devices", "mesh"),
                         [(1, 8, "2x4"), (1, 1, "host"), (2, 4, "2x4")],
                         ids=["1proc_2x4", "1proc_host", "2proc_2x4"])
def test_two_process_save_restores_on_other_process_counts(saved_by_two, processes, devices,
                                                           mesh):
    out = results(run_launch(WORKER, "restore", saved_by_two, mesh, processes=processes,
                             devices_per_process=devices))
    assert [r["bad"] for r in out] == [[]] * processes
    assert [r["checked"] for r in out] == [74 * devices if mesh != "host" else 74] * processes


def test_async_managed_saves_pack_and_old_ones_are_deleted(tmp_path):
    values = {k.replace("/", "_"): v for k, v in _values(120).items()}
    variables = {k: dcheckpoint.Variable(v) for k, v in values.items()
                 if v.dtype.itemsize < 8 or v.dtype == np.complex64}
    manager = dcheckpoint.CheckpointManager(dcheckpoint.Checkpoint(**variables),
                                            str(tmp_path), max_to_keep=1)
    options = dcheckpoint.CheckpointOptions(enable_async=True)
    restored = {k: dcheckpoint.Variable(np.ones(v.shape, v.dtype)) for k, v in variables.items()}
    first = manager.save(options=options)
    for v in variables.values():  # the snapshot was taken: changing values is safe
        v.assign(np.zeros(v.shape, v.dtype))
    manager.sync()
    dcheckpoint.Checkpoint(**restored).restore(first).assert_consumed()
    for k, v in restored.items():
        _same(v.value, values[k])
    second = manager.save(options=options)
    manager.sync()
    names = sorted(n for n in os.listdir(tmp_path) if not n.startswith("."))
    assert names == ["checkpoint", os.path.basename(second)]
    assert dcheckpoint.read_metadata(second).packed is not None
    dcheckpoint.Checkpoint(**restored).restore(second).assert_consumed()
    for k, v in restored.items():
        _same(v.value, np.zeros(values[k].shape, values[k].dtype))


def test_cli_inspect_names_the_packed_files(saved):
    path, _ = saved
    done = subprocess.run([sys.executable, "-m", "dcheckpoint._cli", "inspect", "--json", path],
                          capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    arrays = {a["path"]: a for a in json.loads(done.stdout)["arrays"]}
    assert arrays["step"]["packed_in"] == [f"{_data_dir(path)}/_packed/p0/int64"]
    assert "packed_in" not in arrays["big"]


def test_parallel_tree_removal_never_follows_links(tmp_path):
    from dcheckpoint._state_file import delete_checkpoint
    from dcheckpoint._storage import remove_tree_parallel

    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "keep").write_text("x")
    _engine.save_arrays(str(tmp_path / "ckpt"), {f"a{i}": np.arange(3) for i in range(200)},
                        options=dcheckpoint.CheckpointOptions(pack_below_bytes=0))
    os.symlink(outside / "d", array_dir(tmp_path / "ckpt", "a7") / "link")
    os.symlink(outside / "d" / "keep", tmp_path / "ckpt" / "filelink")
    assert delete_checkpoint(str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt")
    assert (outside / "d" / "keep").read_text() == "x"
    os.symlink(outside, tmp_path / "link")  # the tree itself a link: refused, as rmtree does
    remove_tree_parallel(str(tmp_path / "link"))
    assert (outside / "d" / "keep").exists()


def test_big_endian_values_pack_with_native_ones(tmp_path):
    values = _values()
    values["be"] = np.arange(6, dtype=">f4").reshape(2, 3)
    values["be_int"] = np.arange(5, dtype=">i8")
    _engine.save_arrays(str(tmp_path / "c"), values)
    meta = dcheckpoint.read_metadata(str(tmp_path / "c"))
    assert meta.packed.members["be"][0].packed == f"{_data_dir(tmp_path / 'c')}/_packed/p0/float32"
    out = _engine.restore_arrays(str(tmp_path / "c"), dict.fromkeys(values))
    for name, want in values.items():
        np.testing.assert_array_equal(out[name], want)
        assert out[name].dtype == want.dtype.newbyteorder("=")


def test_ranks_packing_with_different_limits_all_raise_and_nothing_commits(tmp_path):
    directory = str(tmp_path / "ckpt")
    out = results(run_launch(WORKER, "mixlimit", directory, "-", processes=2,
                             devices_per_process=1))
    assert [r["type"] for r in out] == ["CoordinationError"] * 2
    assert all("pack_below_bytes" in r["error"] for r in out)
    assert not os.path.exists(directory)
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_flax_and_optax_state_round_trips_packed(tmp_path):
    import flax.linen as nn
    import optax

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(24):
                x = nn.relu(nn.Dense(8, name=f"dense{i}")(x))
            return nn.LayerNorm()(x)

    params = Deep().init(jax.random.key(0), np.ones((1, 8), np.float32))
    opt_state = optax.adam(1e-3).init(params)
    state = {"params": params, "opt": opt_state}
    path = str(tmp_path / "ckpt")
    dcheckpoint.save_pytree(path, state)
    meta = dcheckpoint.read_metadata(path)
    assert meta.packed is not None and len(meta.packed.members) >= 3 * 48
    target = jax.tree.map(lambda x: None, state)
    restored = dcheckpoint.restore_pytree(path, target)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        _same(got, np.asarray(want))
