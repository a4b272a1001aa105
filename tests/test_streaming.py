"""Restore streams and reads big shards in pieces; the async snapshot's pinned-host path.

Big shards are stored with Zarr v3's sharding codec (inner chunks); the thresholds are
lowered here so small arrays exercise it. Read-once is checked with the process's
``rchar`` (bytes returned by read calls), memory with VmHWM in a fresh subprocess.
"""

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint import _engine
from dcheckpoint import _tensorstore as tsio
from tests.ckpt_files import array_dir
from tests.mp_util import REPO_ROOT


@pytest.fixture
def small_shards(monkeypatch):
    """Shards above 32 KiB get 8 KiB inner chunks (defaults: 16 MiB and 8 MiB)."""
    monkeypatch.setattr(tsio, "_SHARD_ABOVE_BYTES", 32 << 10)
    monkeypatch.setattr(tsio, "INNER_CHUNK_BYTES", 8 << 10)


def _mesh(shape):
    return jax.make_mesh(shape, ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _values(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype == "bfloat16":
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    return (rng.standard_normal(shape) * 1000).astype(dtype)


def _put(values, sharding):
    return jax.make_array_from_callback(values.shape, sharding, lambda idx: values[idx])


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _stored_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files if "json" not in f)


TARGETS = {
    "rows_cols_4x2": lambda: NamedSharding(_mesh((4, 2)), P("x", "y")),
    "cols_rows_2x4": lambda: NamedSharding(_mesh((2, 4)), P("y", "x")),
    "replicated": lambda: NamedSharding(_mesh((4, 2)), P()),
    "one_device": lambda: SingleDeviceSharding(jax.devices()[3]),
    "host": lambda: None,
}


@pytest.mark.parametrize("target", TARGETS, ids=TARGETS)
@pytest.mark.parametrize("saved", ["one_device", "mesh_4x2"])
def test_big_shards_restore_in_pieces_bit_identical(tmp_path, small_shards, saved, target):
    """Coarse to fine (one big shard onto 8 devices) and fine to coarse, every dtype
    width, and inner chunks (1, 14, 64) that the 4x2 slices (2, 35, 64) cut across."""
    arrays = {"f32": _values((256, 48), "float32"), "bf16": _values((256, 128), "bfloat16", 1),
              "i8": _values((128, 320), "int8", 2), "odd": _values((8, 70, 64), "int32", 3)}
    saved_as = (SingleDeviceSharding(jax.devices()[0]) if saved == "one_device"
                else NamedSharding(_mesh((4, 2)), P("x", "y")))
    tree = {k: _put(v, saved_as) for k, v in arrays.items()}
    dcheckpoint.save_pytree(str(tmp_path / "c"), tree)
    zarr_json = json.loads((array_dir(tmp_path / "c", "f32") / "zarr.json").read_text())
    if saved == "one_device":
        assert zarr_json["codecs"][0]["name"] == "sharding_indexed"
        assert zarr_json["codecs"][0]["configuration"]["chunk_shape"] == [32, 48]
    sharding = TARGETS[target]()
    restored = dcheckpoint.restore_pytree(str(tmp_path / "c"), {k: sharding for k in arrays})
    for k, v in arrays.items():
        assert np.asarray(restored[k]).tobytes() == v.tobytes(), k
        if sharding is not None:
            assert restored[k].sharding == sharding


@pytest.mark.parametrize("target", ["rows_cols_4x2", "replicated", "one_device"])
def test_copies_on_the_transfer_thread_restore_bit_identically(tmp_path, small_shards,
                                                               monkeypatch, target):
    """The accelerator path on CPU: every slice taken as bound for an accelerator, so
    its copy runs on the transfer thread (at most two waiting) and the arrays are built
    after the last read; 20 arrays of 8 slices each keep that queue full."""
    real_init = _engine._Slice.__init__

    def accelerator_bound(self, *args):
        real_init(self, *args)
        self.transient = True

    monkeypatch.setattr(_engine._Slice, "__init__", accelerator_bound)
    copies = []  # device_puts handed to a thread pool (saves use pools of their own)
    real_submit = cf.ThreadPoolExecutor.submit

    def submit(pool, fn, *args, **kwargs):
        if getattr(fn, "func", None) is jax.device_put:
            copies.append(fn)
        return real_submit(pool, fn, *args, **kwargs)

    monkeypatch.setattr(cf.ThreadPoolExecutor, "submit", submit)
    arrays = {f"a{i}": _values((64, 48), "float32", i) for i in range(20)}
    dcheckpoint.save_pytree(str(tmp_path / "c"), arrays)
    sharding = TARGETS[target]()
    restored = dcheckpoint.restore_pytree(str(tmp_path / "c"), {k: sharding for k in arrays})
    assert len(copies) == 20 * (8 if target == "rows_cols_4x2" else 1)  # one per slice
    for k, v in arrays.items():
        assert restored[k].sharding == sharding
        assert np.asarray(restored[k]).tobytes() == v.tobytes(), k


def test_sharded_arrays_open_with_zarr_and_tensorstore_alone(tmp_path, small_shards):
    values = _values((256, 64), "float32")
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": values})
    path = str(array_dir(tmp_path / "c", "w"))
    assert zarr.open_array(path, mode="r").shards == (256, 64)
    assert zarr.open_array(path, mode="r").chunks == (32, 64)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], values)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), values)


def test_coarse_to_fine_restore_reads_every_stored_byte_once(tmp_path, monkeypatch):
    """A one-device checkpoint of 8 MiB shards onto a (4, 2) mesh: each device needs a
    slice of every shard; the shards' inner chunks are read once, not once per device
    (the whole-shard layout read each 8 MiB chunk 8 times)."""
    monkeypatch.setattr(tsio, "INNER_CHUNK_BYTES", 256 << 10)
    monkeypatch.setattr(tsio, "_SHARD_ABOVE_BYTES", 1 << 20)
    values = {f"a{i}": _values((1024, 2048), "float32", i) for i in range(2)}
    one = SingleDeviceSharding(jax.devices()[0])
    dcheckpoint.save_pytree(str(tmp_path / "c"), {k: _put(v, one) for k, v in values.items()})
    stored = _stored_bytes(tmp_path / "c")
    target = NamedSharding(_mesh((4, 2)), P("x", "y"))
    before = _rchar()
    restored = dcheckpoint.restore_pytree(str(tmp_path / "c"), {k: target for k in values})
    read = _rchar() - before
    assert stored <= read < stored * 1.05 + (1 << 20), (read, stored)
    for k, v in values.items():
        np.testing.assert_array_equal(np.asarray(restored[k]), v)


def test_flipped_byte_and_truncation_of_a_sharded_shard_are_corruption(tmp_path, small_shards):
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": _values((256, 64), "float32")})
    assert dcheckpoint.verify(str(tmp_path / "c")).problems == ()
    shard = array_dir(tmp_path / "c", "w") / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40_000] ^= 0x01  # inside an inner chunk's data
    shard.write_bytes(bytes(data))
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match="'w'"):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": None})
    assert "crc32c" in str(dcheckpoint.verify(str(tmp_path / "c")).problems)
    shard.write_bytes(bytes(data[:-100]))  # the shard index is at the end
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match="'w'"):
        dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": None})
    assert dcheckpoint.verify(str(tmp_path / "c")).problems


def test_inner_chunks_divide_the_shard_and_stay_within_the_budget():
    cases = [((8192, 8192), 4, (256, 8192)), ((2048, 4096), 4, (512, 4096)),
             ((1021, 8192), 4, None), ((8192, 1021), 4, (2048, 1021)), ((1 << 24,), 4, (1 << 21,)),
             ((4096, 4096), 2, (1024, 4096)), ((5,), 4, None), ((1024, 1024), 4, None)]
    for shape, itemsize, expected in cases:
        inner = tsio.inner_chunk_shape(shape, itemsize)
        assert inner == expected, (shape, inner)
        if inner:
            assert all(s % i == 0 for s, i in zip(shape, inner, strict=True))
            assert np.prod(inner) * itemsize <= tsio.INNER_CHUNK_BYTES


def test_read_window_follows_the_cores_the_memory_and_the_operator(monkeypatch):
    mib = 1 << 20
    monkeypatch.setattr(_engine, "_available_memory", lambda: 64 << 30)
    monkeypatch.delenv("DCHECKPOINT_READ_WINDOW_MIB", raising=False)
    for cores, window, reads in [(2, 256, 16), (16, 512, 32), (64, 1024, 64)]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert _engine.read_window() == (window * mib, reads)
    monkeypatch.setenv("DCHECKPOINT_READ_WINDOW_MIB", "96")  # the operator's bound wins
    assert _engine.read_window()[0] == 96 * mib
    monkeypatch.setattr(_engine, "_available_memory", lambda: 256 * mib)  # and memory
    assert _engine.read_window()[0] == 64 * mib


_MEMORY_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import dcheckpoint
    from dcheckpoint import _engine
    _engine.read_window = lambda: (8 << 20, 2)
    path, target = sys.argv[1], sys.argv[2]
    if target == "accelerator":  # as on a GPU: each slice copied off its host buffer
        init, put = _engine._Slice.__init__, jax.device_put
        def transient(self, *args):
            init(self, *args)
            self.transient = True
        def copying_put(values, targets=None, may_alias=None):
            if not isinstance(values, list):
                return put(values, targets)
            return put([np.array(v, copy=True) for v in values], targets, may_alias=False)
        _engine._Slice.__init__, _engine.jax.device_put = transient, copying_put
    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = None if target == "host" else NamedSharding(mesh, P("x", "y"))
    names = [f"a{i}" for i in range(8)]
    jax.device_put(np.zeros((8, 8)), sharding).block_until_ready() if sharding else None
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = dcheckpoint.restore_pytree(path, {n: sharding for n in names})
    jax.block_until_ready(out)
    extra = status("VmHWM") - base  # before np.asarray below assembles host copies
    ok = all(np.asarray(out[n])[5, 7] == float(i) for i, n in enumerate(names))
    print(json.dumps({"extra": extra, "ok": ok}))
""")


@pytest.mark.parametrize("target", ["host", "mesh", "accelerator"])
def test_restore_memory_beyond_the_arrays_is_bounded_by_the_window(tmp_path, target):
    """256 MiB restored with an 8 MiB window of 2 reads: the peak above the restored
    arrays stays near the window (every read's buffer held to the end, as before
    streaming, would be another 256 MiB; the slack is allocator and runtime noise).
    "accelerator" copies every slice to its device off the host buffer, on the transfer
    thread, as on a GPU: those buffers must be freed as their copies finish."""
    one = SingleDeviceSharding(jax.devices()[0])
    tree = {f"a{i}": jax.device_put(np.full((2048, 4096), float(i), np.float32), one)
            for i in range(8)}
    dcheckpoint.save_pytree(str(tmp_path / "c"), tree)
    del tree
    nbytes = 8 * 2048 * 4096 * 4
    proc = subprocess.run([sys.executable, "-c", _MEMORY_WORKER, str(tmp_path / "c"), target],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"]
    assert report["extra"] < nbytes * 3 // 2, (report, nbytes)


def test_restore_into_a_host_memory_kind_keeps_it(tmp_path, small_shards):
    values = _values((256, 64), "float32")
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": values})
    target = NamedSharding(_mesh((4, 2)), P("x"), memory_kind="pinned_host")
    restored = dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": target})["w"]
    assert restored.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(restored), values)


def test_pinned_host_snapshot_is_a_copy_that_outlives_deletion_and_donation():
    """The accelerator path of `snapshot`, run on CPU devices (which have pinned_host
    memory too): the host copies do not change when the arrays are deleted, donated
    or overwritten afterwards."""
    values = [np.arange(64, dtype=np.float32).reshape(8, 8) + i for i in range(3)]
    arrays = [jax.device_put(v, jax.devices()[i]) for i, v in enumerate(values)]
    copies = _engine._pinned_snapshots(arrays, cpu=True)
    assert set(copies) == {id(a) for a in arrays}
    host = [copies[id(a)] for a in arrays]
    step = jax.jit(lambda x: x * 0 - 5.0, donate_argnums=0)
    after = step(arrays[0])
    arrays[1].delete()
    del arrays
    assert np.all(np.asarray(after) == -5.0)
    for h, v in zip(host, values, strict=True):
        np.testing.assert_array_equal(h, v)


def test_cpu_snapshot_stays_a_zero_copy_view():
    array = jax.device_put(np.arange(1 << 16, dtype=np.float32), jax.devices()[0])
    assert _engine._pinned_snapshots([array]) == {}
    plan = _engine.plan_save({"w": array}, is_coordinator=True)
    snap = _engine.snapshot(plan)
    host = snap.writes[0].data
    assert host.ctypes.data == array.unsafe_buffer_pointer()


def test_restore_without_writes_into_numpy_reads_and_copies(tmp_path, small_shards, monkeypatch):
    """The path for a TensorStore that cannot write into a numpy buffer."""
    values = _values((256, 64), "float32")
    one = SingleDeviceSharding(jax.devices()[0])
    dcheckpoint.save_pytree(str(tmp_path / "c"), {"w": _put(values, one)})
    monkeypatch.setattr(tsio, "_WRITES_INTO_NUMPY", False)
    target = NamedSharding(_mesh((4, 2)), P("x", "y"))
    restored = dcheckpoint.restore_pytree(str(tmp_path / "c"), {"w": target})["w"]
    np.testing.assert_array_equal(np.asarray(restored), values)
    assert tsio.writable_view(np.zeros(4)) is None
