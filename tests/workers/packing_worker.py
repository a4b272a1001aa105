"""Saves or restores a state of many small arrays under ``python -m launch``.

usage: packing_worker.py save DIR MESH   |   packing_worker.py restore DIR MESH|host
       packing_worker.py mixlimit DIR -      (ranks save with different packing limits)

The state: 72 small arrays (packed: sharded ones, replicated ones, scalars, three
dtypes) and one large array (not packed). Values are a function of the name and the
global index, so every process checks its own shards. Prints one ``RESULT`` per process.
"""

import json
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402

DTYPES = ("float32", "int32", "uint8")


def arrays() -> dict[str, tuple[tuple, str, P]]:
    """{name: (shape, dtype, saved spec)}."""
    out = {}
    for i in range(24):
        dtype = DTYPES[i % 3]
        out[f"rows{i}"] = ((8, 2 + i % 3), dtype, P("x"))        # one chunk per x
        out[f"grid{i}"] = ((4, 6), dtype, P("x", "y"))           # 4 x 2 chunks
        out[f"repl{i}"] = ((5 + i,), dtype, P())                 # replicated, one chunk
    out["step"] = ((), "int32", P())
    out["big"] = ((1024, 512), "float32", P("x"))                # 512 KiB shards: unpacked
    return out


def expected(name: str, shape: tuple, dtype: str) -> np.ndarray:
    flat = np.arange(int(np.prod(shape)), dtype=np.int64) * 3 + len(name) * 7
    return (flat % 251).astype(dtype).reshape(shape)


def make_mesh(text):
    dims = tuple(int(d) for d in text.split("x"))
    return jax.make_mesh(dims, ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


mode, directory, mesh_text = sys.argv[1:4]
if mode == "mixlimit":
    # Rank 1 packs nothing, rank 0 packs: both must raise the same error, nothing commits.
    tree = {f"a{i}": np.arange(i + 1, dtype=np.float32) for i in range(70)}
    limit = 0 if info.process_index == 1 else 4096
    try:
        dcheckpoint.save_pytree(directory, tree,
                                options=dcheckpoint.CheckpointOptions(pack_below_bytes=limit))
        outcome = {"error": None}
    except dcheckpoint.CheckpointError as e:
        outcome = {"error": str(e), "type": type(e).__name__}
    print("RESULT " + json.dumps({"rank": info.process_index, **outcome}), flush=True)
elif mode == "save":
    mesh = make_mesh(mesh_text)
    tree = {}
    for name, (shape, dtype, spec) in arrays().items():
        values = expected(name, shape, dtype)
        tree[name] = jax.make_array_from_callback(
            shape, NamedSharding(mesh, spec), lambda idx, v=values: v[idx])
    path = dcheckpoint.save_pytree(directory, tree)
    print("RESULT " + json.dumps({"rank": info.process_index, "path": path}), flush=True)
else:
    if mesh_text == "host":
        target = {name: None for name in arrays()}
    else:
        mesh = make_mesh(mesh_text)
        # Reversed specs: every sharded array lands on another layout than it was saved.
        target = {name: NamedSharding(mesh, P(*reversed(spec)) if spec else P())
                  for name, (_, _, spec) in arrays().items()}
    out = dcheckpoint.restore_pytree(directory, target)
    checked, bad = 0, []
    for name, (shape, dtype, _) in arrays().items():
        value, want = out[name], expected(name, shape, dtype)
        if isinstance(value, np.ndarray):
            pieces = [((slice(None),) * want.ndim, value)]
        else:
            pieces = [(s.index, np.asarray(s.data)) for s in value.addressable_shards]
        for index, data in pieces:
            checked += 1
            if data.dtype != want.dtype or data.tobytes() != want[index].tobytes():
                bad.append(name)
    print("RESULT " + json.dumps({"rank": info.process_index, "checked": checked,
                                  "bad": bad}), flush=True)
