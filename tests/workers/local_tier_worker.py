"""Run by tests/test_local_tier.py under ``python -m launch``: the local tier.

``train PERSISTENT HOSTS ORDER STEPS [KILL_STEP]``: a PytreeManager saves to the local
tier every 2 steps and persistently every 4; with KILL_STEP, every process SIGKILLs
itself in the middle of that step's local save (own and peer copies written, not
committed). ``restore PERSISTENT HOSTS ORDER MESH``: restores onto a MESH ("2x4")
target and checks every local shard against the step it came from, bit for bit.
ORDER names the host directory of each rank (``HOSTS/host<ORDER[rank]>``), so a
restart can renumber ranks. One ``RESULT {json}`` line per process.
"""

import json
import logging
import os
import signal
import sys

import launch

info = launch.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402
from dcheckpoint import _local_tier  # noqa: E402

logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                    format=f"[rank {info.process_index}] %(name)s: %(message)s")

mode, persistent, hosts, order = sys.argv[1:5]
host = int(order.split(",")[info.process_index])
local = os.path.join(hosts, f"host{host}")


def expected(step):
    return {"w": np.arange(16 * 8, dtype=np.float32).reshape(16, 8) * step + 0.5,
            "b": np.full((6,), step, np.float32)}


def state_on(mesh, step):
    values = expected(step)
    w = jax.make_array_from_callback((16, 8), NamedSharding(mesh, P("x", "y")),
                                     lambda i: values["w"][i])
    b = jax.device_put(values["b"], NamedSharding(mesh, P()))
    return {"w": w, "b": b, "count": np.int32(step)}


# LOCAL_DOMAINS="r1,r1,r1,r2": each host's failure domain (default: the host name).
domains = os.environ.get("LOCAL_DOMAINS")
domain = domains.split(",")[host] if domains else None


def manager():
    return dcheckpoint.PytreeManager(persistent, max_to_keep=2, save_interval_steps=5,
                                     local_directory=local, local_every=2,
                                     local_max_to_keep=2, local_failure_domain=domain,
                                     options=dcheckpoint.CheckpointOptions(enable_async=True))


if mode == "train":
    steps = int(sys.argv[5])
    kill_step = int(sys.argv[6]) if len(sys.argv) > 6 else None
    real_agree = _local_tier.agree

    def agree(comm, value, decide, *, kind, **kwargs):
        if kind == "local save" and value.get("step") == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)  # both copies written, no commit
        return real_agree(comm, value, decide, kind=kind, **kwargs)

    _local_tier.agree = agree
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    m = manager()
    for step in range(1, steps + 1):
        m.save(step, state_on(mesh, step))
    m.sync()
    print("RESULT " + json.dumps({"rank": info.process_index, "local": m.local_steps,
                                  "persistent": m.all_steps()}), flush=True)
    m.close()
else:
    rows, cols = map(int, sys.argv[5].split("x"))
    mesh = jax.make_mesh((rows, cols), ("x", "y"))
    m = manager()
    target = jax.eval_shape(lambda: state_on(mesh, 0))
    target["w"] = jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                       sharding=NamedSharding(mesh, P("x", "y")))
    target["b"] = jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh, P()))
    restored = m.restore(target=target)
    step = int(restored["count"])
    want = expected(step)
    identical = all(np.array_equal(np.asarray(shard.data), want[name][shard.index])
                    for name in ("w", "b") for shard in restored[name].addressable_shards)
    print("RESULT " + json.dumps({
        "rank": info.process_index, "step": step, "from": m.restored_from,
        "identical": identical, "shards": len(restored["w"].addressable_shards),
        "mesh": dict(restored["w"].sharding.mesh.shape)}), flush=True)
    m.close()
