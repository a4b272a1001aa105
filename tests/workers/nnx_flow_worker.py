"""A flax nnx + optax + grain training job, checkpointed the way JAX users do.

``--api pytree``: ``PytreeManager.save(step, {"model": nnx.state(model), "opt": ...})``
(async), and a resume from ``jax.eval_shape`` targets with the new mesh's shardings.
``--api object``: ``Checkpoint(model=model, opt=opt, data=iterator)`` in a
``CheckpointManager``, resumed into modules made by ``nnx.eval_shape``.
Parameters live sharded on ``--mesh`` (what is saved and resharded); each step runs on
one device, so the arithmetic is the same on every mesh and a resumed run can be
compared bit for bit with an uninterrupted one. ``--kill-after S`` SIGKILLs the job
right after step S. Prints ``RESULT {"digest", "loss", "resumed_from", ...}``.
"""

import argparse
import hashlib
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import launch

parser = argparse.ArgumentParser()
parser.add_argument("--dir", required=True)
parser.add_argument("--api", choices=["pytree", "object"], required=True)
parser.add_argument("--mesh", default="4x2")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--every", type=int, default=3)
parser.add_argument("--kill-after", type=int, default=None)
args = parser.parse_args()
launch.initialize()

import grain  # noqa: E402  (after the backend is set up)

import dcheckpoint  # noqa: E402

if args.mesh == "1":
    MESH = None
else:
    MESH = jax.make_mesh(tuple(int(n) for n in args.mesh.split("x")), ("x", "y"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
ONE = jax.devices()[0]


class Net(nnx.Module):
    def __init__(self, seed: int):
        rngs = nnx.Rngs(seed, dropout=seed + 1)
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.hidden(x))))


def sharding_of(x):
    """Dim 0 over x and dim 1 over y where they divide; keys and scalars replicate."""
    if MESH is None:
        return SingleDeviceSharding(ONE)
    axes = [a for a, d in zip(("x", "y"), x.shape, strict=False) if d % MESH.shape[a] == 0]
    return NamedSharding(MESH, P(*axes))


def place(state, where):
    return jax.tree.map(lambda x: jax.device_put(x, where(x)), state)


def make(seed=0):
    model = Net(seed)
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model, opt, x, y):
    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


def batch(indices):
    idx = np.asarray(indices, np.float32)[:, None]
    x = np.sin(idx * np.arange(1, 9, dtype=np.float32) / 7)
    return x, np.cos(x[:, :4] * 3)


def step_once(model, opt, iterator):
    """One step on one device (fixed arithmetic), state placed back on the mesh."""
    nnx.update((model, opt), place(nnx.state((model, opt)), lambda x: ONE))
    loss = train_step(model, opt, *batch(next(iterator)))
    nnx.update((model, opt), place(nnx.state((model, opt)), sharding_of))
    return loss


def digest(model, opt):
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(nnx.state((model, opt))):
        data = jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) \
            else leaf
        h.update(np.asarray(data).tobytes())
    return h.hexdigest()


dataset = grain.MapDataset.range(10_000).shuffle(seed=7).batch(4)
iterator = iter(dataset)
resumed_from = None
placed_on = None
options = dcheckpoint.CheckpointOptions(enable_async=True)

if args.api == "pytree":
    manager = dcheckpoint.PytreeManager(args.dir, max_to_keep=2, options=options,
                                        save_interval_steps=args.every)
    start = 0
    if manager.latest_step() is not None:
        # The Orbax idiom: an abstract state, given the new mesh's shardings.
        abstract = jax.eval_shape(lambda: {"model": nnx.state(make()[0]),
                                           "opt": nnx.state(make()[1])})
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_of(s)),
            abstract)
        restored = manager.restore(target=abstract)
        model, opt = make(seed=99)  # other values: the restore must replace them all
        nnx.update(model, restored["model"])
        nnx.update(opt, restored["opt"])
        start = resumed_from = manager.latest_step()
        iterator.set_state(manager.metadata(start)["data"])
        placed_on = str(model.hidden.kernel.get_value().sharding)
    else:
        model, opt = make()
        nnx.update((model, opt), place(nnx.state((model, opt)), sharding_of))
    for step in range(start + 1, args.steps + 1):
        loss = step_once(model, opt, iterator)
        manager.save(step, {"model": nnx.state(model), "opt": nnx.state(opt)},
                     metadata={"data": iterator.get_state(), "loss": loss})
        if step == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    manager.close()
else:
    step_var = dcheckpoint.Variable(np.int32(0))
    abstract_model, abstract_opt = nnx.eval_shape(make)
    fresh = not dcheckpoint.latest_checkpoint(args.dir)
    model, opt = make() if fresh else (abstract_model, abstract_opt)
    if fresh:
        nnx.update((model, opt), place(nnx.state((model, opt)), sharding_of))
    else:  # placeholders with the new mesh's shardings, filled by the restore
        nnx.update((model, opt), jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_of(s)),
            nnx.state((model, opt))))
    ckpt = dcheckpoint.Checkpoint(model=model, opt=opt, data=iterator, step=step_var)
    manager = dcheckpoint.CheckpointManager(ckpt, args.dir, max_to_keep=2,
                                            step_counter=step_var,
                                            checkpoint_interval=args.every)
    if manager.restore_or_initialize() is not None:
        resumed_from = manager.latest_step()
        placed_on = str(model.hidden.kernel.get_value().sharding)
    for step in range(int(step_var.value) + 1, args.steps + 1):
        loss = step_once(model, opt, iterator)
        step_var.assign(np.int32(step))
        manager.save(options=options)
        if step == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    manager.sync()

print("RESULT " + json.dumps({"rank": jax.process_index(),
    "digest": digest(model, opt), "loss": float(loss).hex(), "resumed_from": resumed_from,
    "placed_on": placed_on,
}), flush=True)
