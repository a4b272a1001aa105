"""The benchmark's contestants behind one interface: make state, save, restore.

Each adapter builds the same workload (same shapes, same random float32 bytes per
shard) in its own framework and saves/restores it with that system's ordinary public
API and default settings. ``scripts/bench_worker.py`` drives them; nothing here times.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

__all__ = ["workload_shapes", "make_system", "shard_data"]


def workload_shapes(workload: str, total_bytes: int, n_arrays: int) -> list[tuple[int, ...]]:
    """Shapes of one workload: ``large`` = equal 2-D arrays; ``small`` = many 1-D ones.

    Large arrays have both dimensions divisible by 8 so every mesh used here (4x2, 2x4,
    up to 4 processes) divides them; small ones are 1 KiB .. 256 KiB, log-uniform, scaled
    to the total. ``many``: 1-D arrays of 1 KiB .. 16 KiB, log-uniform (``total_bytes``
    is ignored); ``tiny``: ``n_arrays`` equal 1-D arrays of ``total_bytes / n_arrays``.
    """
    if workload.startswith("large"):  # large, large4g
        side = int((total_bytes / n_arrays / 4) ** 0.5) // 64 * 64
        return [(side, side)] * n_arrays
    rng = np.random.default_rng(1)
    if workload == "many":
        sizes = np.exp(rng.uniform(np.log(1024), np.log(16 * 1024), n_arrays))
        return [(int(s) // 4,) for s in sizes]
    if workload == "tiny":
        return [(max(1, total_bytes // n_arrays // 4),)] * n_arrays
    sizes = np.exp(rng.uniform(np.log(1024), np.log(256 * 1024), n_arrays))
    sizes = np.clip(sizes * total_bytes / sizes.sum(), 1024, 256 * 1024)
    return [(int(s) // 256 * 64,) for s in sizes]


def shard_data(array_index: int, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Random float32 values of one slice, reproducible from (array, slice start)."""
    starts = tuple(s.start or 0 for s in index)
    local = tuple((s.stop if s.stop is not None else d) - (s.start or 0)
                  for s, d in zip(index, shape, strict=True))
    rng = np.random.default_rng([array_index, *starts])
    return rng.random(local, dtype=np.float32)


def make_system(name: str):
    return {"dcheckpoint": Dcheckpoint, "orbax": Orbax, "dcp": TorchDCP, "raw": Raw}[name]()


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.isfile(path):
        os.unlink(path)


class _Jax:
    """Shared JAX state building: a (4, 2) mesh over all devices of the job."""

    def make_state(self, shapes, workload):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = np.array(jax.devices())
        self.meshes = {
            "4x2": Mesh(devices.reshape(4, 2), ("x", "y")),
            "2x4": Mesh(devices.reshape(2, 4), ("x", "y")),
        }
        spec = PartitionSpec("x", "y") if workload != "small" else PartitionSpec()
        sharding = NamedSharding(self.meshes["4x2"], spec)
        if workload in ("many", "tiny"):  # one device each, as DCP's plain tensors
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = {}
        for i, shape in enumerate(shapes):
            state[f"a{i:04d}"] = jax.make_array_from_callback(
                shape, sharding, lambda idx, i=i, shape=shape: shard_data(i, idx, shape))
        jax.block_until_ready(state)
        self.state, self.workload = state, workload
        return state

    def targets(self, layout):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        if self.workload in ("many", "tiny"):
            return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in self.state.items()}
        if layout == "replicated" or self.workload == "small":
            spec, mesh = PartitionSpec(), self.meshes["4x2"]
        else:
            spec, mesh = PartitionSpec("x", "y"), self.meshes[layout]
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec))
                for k, v in self.state.items()}

    def block(self, tree):
        import jax

        jax.block_until_ready(tree)

    def check(self, restored):
        """Single process: array a0000 restored equals what was saved."""
        got, want = np.asarray(restored["a0000"]), np.asarray(self.state["a0000"])
        if not np.array_equal(got, want):
            raise AssertionError("restored a0000 differs from the saved values")


class Dcheckpoint(_Jax):
    def clear(self, path):
        """Deletes a previous checkpoint at ``path``; the worker calls it untimed."""
        _remove(path)

    def save(self, path):
        import dcheckpoint

        dcheckpoint.save_pytree(path, self.state)

    def restore(self, path, layout):
        import dcheckpoint

        out = dcheckpoint.restore_pytree(path, self.targets(layout))
        self.block(out)
        return out

    def verify(self, path):
        from dcheckpoint._verify import verify

        report = verify(path)
        if not report.ok:
            raise AssertionError(f"verify found problems: {report.problems[:3]}")

    def delete(self, path):
        from dcheckpoint._state_file import delete_checkpoint

        delete_checkpoint(path)

    def async_save(self, path):
        """Returns a function that waits for the background part."""
        import dcheckpoint

        if not hasattr(self, "ckpt"):
            self.ckpt = dcheckpoint.Checkpoint(state=self.state)
        self.ckpt.write(path, options=dcheckpoint.CheckpointOptions(enable_async=True))
        return self.ckpt.sync


class Orbax(_Jax):
    """Orbax's defaults (OCDBT, zarr3, zstd compression: ``use_compression=True``)."""

    def __init__(self):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.sync_ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        self.async_ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())

    def make_state(self, shapes, workload):
        if workload == "small":
            # Replica-parallel saving splits each replicated array across the 8 devices'
            # replicas: 8x the writes for 2,000 small arrays. Off, as a user would set it.
            import jax
            from orbax.checkpoint._src.metadata import array_metadata_store

            # As Orbax registers its default jax.Array handler, with the one change.
            handler = self.ocp.type_handlers.ArrayHandler(
                use_replica_parallel=False, array_metadata_store=array_metadata_store.Store())
            self.ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        return super().make_state(shapes, workload)

    def clear(self, path):
        _remove(path)

    def save(self, path):
        self.sync_ckptr.save(os.path.abspath(path), args=self.ocp.args.StandardSave(self.state))

    def restore(self, path, layout):
        out = self.sync_ckptr.restore(
            os.path.abspath(path), args=self.ocp.args.StandardRestore(self.targets(layout)))
        self.block(out)
        return out

    def async_save(self, path):
        self.async_ckptr.save(os.path.abspath(path),
                              args=self.ocp.args.StandardSave(self.state))
        return self.async_ckptr.wait_until_finished


class TorchDCP:
    """DTensors on a 1-D CPU mesh over gloo (one rank per process), Shard(0) saved."""

    def __init__(self):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        rank, size = _mpi_rank_size()
        if not dist.is_initialized():
            port = _agree_port(rank, size)
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                    rank=rank, world_size=size)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh("cpu", (size,))
        self.rank, self.size = rank, size

    def make_state(self, shapes, workload):
        from torch.distributed.tensor import DTensor, Shard

        self.workload, state = workload, {}
        for i, shape in enumerate(shapes):
            if workload in ("small", "many", "tiny"):  # plain tensors, as small optimizer state
                state[f"a{i:04d}"] = self.torch.from_numpy(
                    shard_data(i, (slice(None),) * len(shape), shape))
                continue
            rows = shape[0] // self.size
            idx = (slice(self.rank * rows, (self.rank + 1) * rows), slice(0, shape[1]))
            local = self.torch.from_numpy(shard_data(i, idx, shape))
            state[f"a{i:04d}"] = DTensor.from_local(local, self.mesh, [Shard(0)],
                                                    run_check=False)
        self.state = state
        return state

    def targets(self, layout):
        from torch.distributed.tensor import Replicate, Shard, zeros

        out = {}
        for k, v in self.state.items():
            if self.workload in ("small", "many", "tiny"):
                out[k] = self.torch.empty_like(v)
                continue
            placement = {"4x2": Shard(0), "2x4": Shard(1), "replicated": Replicate()}[layout]
            out[k] = zeros(v.shape, device_mesh=self.mesh, placements=[placement])
        return out

    def clear(self, path):
        if self.rank == 0:
            _remove(path)
        self.dist.barrier()

    def save(self, path):
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state, checkpoint_id=path)

    def restore(self, path, layout):
        import torch.distributed.checkpoint as dcp

        target = self.targets(layout)
        dcp.load(target, checkpoint_id=path)
        return target

    def delete(self, path):
        _remove(path)

    def async_save(self, path):
        import torch.distributed.checkpoint as dcp

        future = dcp.async_save(self.state, checkpoint_id=path)
        done = getattr(future, "upload_completion", future)
        return done.result

    def block(self, tree):
        del tree

    def check(self, restored):
        got, want = restored["a0000"], self.state["a0000"]
        if hasattr(got, "full_tensor"):
            got, want = got.full_tensor(), want.full_tensor()
        if not self.torch.equal(got, want):
            raise AssertionError("restored a0000 differs from the saved values")


class Raw:
    """The disk's limit: one file per array slice, 16 threads writing (write+fsync) or
    reading them at once, no encoding or checksums."""

    THREADS = 16

    def make_state(self, shapes, workload):
        rank, size = _mpi_rank_size()
        self.rank = rank
        self.state = {}
        for i, shape in enumerate(shapes):
            if workload == "small" and rank != 0:
                continue
            rows = shape[0] // size if workload != "small" else shape[0]
            start = rank * rows if workload != "small" else 0
            idx = (slice(start, start + rows),) + tuple(slice(0, d) for d in shape[1:])
            self.state[f"a{i:04d}"] = shard_data(i, idx, shape)
        return self.state

    def clear(self, path):
        _remove(path)

    def _map(self, fn):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.THREADS) as pool:
            return dict(zip(self.state, pool.map(fn, self.state.items()), strict=True))

    def save(self, path):
        os.makedirs(path, exist_ok=True)

        def write(item):
            k, v = item
            with open(os.path.join(path, f"{k}.{self.rank}"), "wb") as f:
                f.write(memoryview(v).cast("B"))
                f.flush()
                os.fsync(f.fileno())

        self._map(write)

    def restore(self, path, layout):
        del layout

        def read(item):
            k, v = item
            buf = np.empty_like(v)
            with open(os.path.join(path, f"{k}.{self.rank}"), "rb", buffering=0) as f:
                f.readinto(memoryview(buf).cast("B"))
            return buf

        return self._map(read)

    def block(self, tree):
        del tree

    def check(self, restored):
        if not np.array_equal(restored["a0000"], self.state["a0000"]):
            raise AssertionError("raw read differs")


def _mpi_rank_size() -> tuple[int, int]:
    for r, s in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if r in os.environ:
            return int(os.environ[r]), int(os.environ[s])
    return 0, 1


def _agree_port(rank: int, size: int) -> int:
    import socket

    port = 0
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    if size > 1:
        from mpi4py import MPI

        port = MPI.COMM_WORLD.bcast(port, root=0)
    return port
