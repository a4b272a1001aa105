"""Saves or restores deterministic arrays under ``python -m launch``; prints what it checked.

usage: engine_worker.py save DIR MESH   |   engine_worker.py restore DIR MESH|host
MESH is like 4x2. Values are a function of the global index, so every process can check
its own shards without reading anyone else's.
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

SPECS = {"w": P("x", "y"), "rows": P("x"), "cols": P(None, "y"), "replicated": P()}


def expected(name):
    shape = {"w": (16, 8), "rows": (8, 3), "cols": (12, 8), "replicated": (3, 3)}[name]
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 1.5 + len(name))


def make_mesh(text):
    dims = tuple(int(d) for d in text.split("x"))
    return jax.make_mesh(dims, ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


mode, directory, mesh_text = sys.argv[1:4]
if mode == "mismatch":
    # Process 1 saves one array more than process 0: every process must raise the same
    # error and nothing may be committed.
    tree = {"w": np.ones(4, np.float32)}
    if info.process_index == 1:
        tree["extra"] = np.zeros(2, np.float32)
    try:
        dcheckpoint.save_pytree(directory, tree)
        outcome = {"error": None}
    except dcheckpoint.CheckpointError as e:
        outcome = {"error": str(e), "type": type(e).__name__}
    print("RESULT " + json.dumps({"rank": info.process_index, **outcome}), flush=True)
elif mode == "save":
    mesh = make_mesh(mesh_text)
    tree = {}
    for name, spec in SPECS.items():
        values = expected(name)
        tree[name] = jax.make_array_from_callback(
            values.shape, NamedSharding(mesh, spec), lambda idx, v=values: v[idx])
    # A value each process holds on its own devices only: the coordinator's copy is saved.
    local = jax.device_put(np.full(3, 7.0 + info.process_index, np.float32),
                           jax.local_devices()[0])
    path = dcheckpoint.save_pytree(directory, {"model": tree, "step": np.int32(42),
                                               "local": local})
    print("RESULT " + json.dumps({"rank": info.process_index, "path": path}), flush=True)
else:
    if mesh_text == "host":
        target = {"model": {name: None for name in SPECS}, "step": None, "local": None}
    else:
        mesh = make_mesh(mesh_text)
        # Transposed specs on purpose: every array lands on a different layout than saved.
        target = {"model": {name: NamedSharding(mesh, P(*reversed(spec)))
                            for name, spec in SPECS.items()}, "step": None, "local": None}
    out = dcheckpoint.restore_pytree(directory, target)
    checked, bad = 0, []
    for name in SPECS:
        value = out["model"][name]
        want = expected(name)
        if isinstance(value, np.ndarray):
            pieces = [((slice(None),) * want.ndim, value)]
        else:
            pieces = [(s.index, np.asarray(s.data)) for s in value.addressable_shards]
        for index, data in pieces:
            checked += 1
            if data.tobytes() != want[index].tobytes():
                bad.append(name)
    print("RESULT " + json.dumps({
        "rank": info.process_index, "checked": checked, "bad": bad,
        "step": int(out["step"]), "devices": jax.device_count(),
        "local": out["local"].tolist(),
    }), flush=True)
