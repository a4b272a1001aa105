"""One process of a scale job (scripts/scale.py --mpiexec, tests/test_scale_mp.py).

usage (under ``python -m launch -n N --devices-per-process 1``):
  scale_worker.py save DIR ARRAYS      two saves (first, steady) of an FSDP-like state,
                                       restored on this job and checked bit-identical;
                                       prints each save's phases
  scale_worker.py restore DIR ARRAYS   restores DIR/steady onto this job's devices
  scale_worker.py fail DIR ARRAYS      a save in which process 5 raises while writing,
                                       then one in which process 7 hangs while writing
  scale_worker.py save+fail DIR ARRAYS both, in one job (the tests' 16-process case)

Every rank prints one ``RESULT {json}`` line. Values are a function of the array number
and the global index, so each process checks its own shards without reading others'.
"""

from __future__ import annotations

import json
import sys
import time

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402
from dcheckpoint import _engine  # noqa: E402

ROWS = 48  # per array, divisible by 1, 2, 3, 4, 8, 16 (and so by every job size used)


def spec_and_shape(k: int) -> tuple[P, tuple[int, ...]]:
    """Array k: 7 in 10 weights sharded on rows (FSDP), 2 on columns, 1 replicated."""
    kind = k % 10
    if kind < 7:
        return P("fsdp", None), (ROWS * 10, 256)
    if kind < 9:
        return P(None, "fsdp"), (64, ROWS * 4)
    return P(), (256,)


def values(k: int, index: tuple[slice, ...], shape, seed: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)],
                        indexing="ij")
    flat = np.ravel_multi_index(grids, shape) if grids else np.zeros(())
    return (flat % 65521 + k * 0.25 + seed).astype(np.float32)


def state(mesh, arrays: int, seed: float) -> dict:
    out = {}
    for k in range(arrays):
        spec, shape = spec_and_shape(k)
        out[f"layer{k // 10:03d}/p{k % 10}"] = jax.make_array_from_callback(
            shape, NamedSharding(mesh, spec), lambda idx, k=k, s=shape: values(k, idx, s, seed))
    return out


def check(restored: dict, seed: float) -> list[str]:
    """Paths whose local shards differ from the expected values."""
    bad = []
    for name, array in restored.items():
        k = int(name[5:8]) * 10 + int(name[-1])
        for shard in array.addressable_shards:
            if not np.array_equal(np.asarray(shard.data),
                                  values(k, shard.index, array.shape, seed)):
                bad.append(name)
                break
    return bad


def targets(mesh, arrays: int) -> dict:
    out = {}
    for k in range(arrays):
        spec, shape = spec_and_shape(k)
        out[f"layer{k // 10:03d}/p{k % 10}"] = jax.ShapeDtypeStruct(
            shape, np.float32, sharding=NamedSharding(mesh, spec))
    return out


def save(directory: str, arrays: int, mesh) -> dict:
    saves = []
    for kind, seed in (("first", 1.0), ("steady", 2.0)):
        tree = state(mesh, arrays, seed)
        started = time.perf_counter()
        dcheckpoint.save_pytree(f"{directory}/{kind}", tree)
        total = time.perf_counter() - started
        saves.append({"save": kind, "total_s": total,
                      **_engine.LAST_SAVE_PHASES[info.process_index]})
    started = time.perf_counter()
    restored = dcheckpoint.restore_pytree(f"{directory}/steady", targets(mesh, arrays))
    restore_s = time.perf_counter() - started
    return {"saves": saves, "restore_s": restore_s, "bad": check(restored, 2.0)}


def restore(directory: str, arrays: int, mesh) -> dict:
    restored = dcheckpoint.restore_pytree(f"{directory}/steady", targets(mesh, arrays))
    return {"bad": check(restored, 2.0), "checked": sum(
        len(a.addressable_shards) for a in restored.values())}


def fail(directory: str, arrays: int, mesh) -> dict:
    """Process 5 raises, then process 7 hangs, in the middle of a save's writes."""
    tree = state(mesh, arrays, 3.0)
    real_write = _engine._write_chunks
    out = {}
    for case, rank in (("raised", 5), ("hung", 7)):
        def write(*args, case=case, rank=rank, **kwargs):
            chunks = real_write(*args, **kwargs)
            if info.process_index == rank:
                if case == "raised":
                    raise OSError("injected: disk full")
                time.sleep(12)  # past the save's 3 s timeout
            return chunks

        _engine._write_chunks = write  # a test's fault injection, this process only
        options = dcheckpoint.CheckpointOptions(timeout_secs=3)
        started = time.perf_counter()
        try:
            dcheckpoint.save_pytree(f"{directory}/{case}", tree, options=options)
            out[case] = [None, None]
        except dcheckpoint.CheckpointError as e:
            out[case] = [type(e).__name__, str(e)]
        out[f"{case}_s"] = time.perf_counter() - started
        _engine._write_chunks = real_write
    return out


def main() -> None:
    mode, directory, arrays = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    result = {}
    for step in mode.split("+"):
        result.update({"save": save, "restore": restore, "fail": fail}[step](
            directory, arrays, mesh))
    print("RESULT " + json.dumps({"rank": info.process_index,
                                  "processes": info.process_count, **result}), flush=True)


if __name__ == "__main__":
    main()
