"""A preemptible, reshardable training job: a two-layer MLP trained data- and model-parallel.

Run it as a multi-process job (each process joins with ``launch.initialize()``)::

    python -m launch -n 2 --devices-per-process 4 scripts/train.py --mesh 4x2 --dir /tmp/run
    python -m launch -n 1 --devices-per-process 8 scripts/train.py --mesh 2x4 --dir /tmp/run

The mesh has axes ``("data", "model")``: the batch is split over ``data``, the hidden
dimension over ``model``. Parameters, Adam's moments, the step and the data position live
in ``Variable``s saved by a ``DTensorCheckpoint`` that a ``CheckpointManager`` saves
asynchronously every ``--save-every`` steps. A restarted job calls
``restore_or_initialize()`` and continues from the newest committed checkpoint, whatever
mesh or process count it now runs on.

Bit-exact on any mesh. The result does not depend on the mesh: the global batch of step
``s`` is drawn from ``(seed, s)``, and every sum that crosses devices is made layout-free.
The batch is cut into ``BATCH_GROUPS`` fixed groups and the hidden dimension into
``HIDDEN_BLOCKS`` fixed blocks; each device computes the partial results of the groups
and blocks it holds (every contraction has the same length on every mesh), the partials
are all-gathered (a copy, no arithmetic), and each device adds them in the same fixed
order. A plain ``psum`` would add 2 partials on one mesh and 4 on another, so float32
rounding would differ in the last bits from the first step on.

Log lines (process 0) start with ``[train]``; the last one is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import launch

INFO = launch.initialize()  # before anything touches JAX devices

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dcheckpoint  # noqa: E402
from mesh import Layout, Mesh  # noqa: E402

__all__ = ["Config", "Model", "Adam", "main"]

BATCH_GROUPS = 8  # the batch is summed in 8 fixed groups: any data axis of 1, 2, 4, 8 works
HIDDEN_BLOCKS = 8  # the hidden dimension likewise, for the model axis
SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and optimiser sizes; the same on every mesh (the checkpoint depends on them)."""

    seed: int = 0
    batch: int = 64
    d_in: int = 16
    hidden: int = 64
    d_out: int = 4
    learning_rate: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


class Model(dcheckpoint.AutoTrackable):
    """The MLP's parameters, each a Variable laid out on the mesh (saved as model/w1, ...)."""

    def __init__(self, mesh: Mesh, cfg: Config):
        shapes = {
            "w1": (cfg.d_in, cfg.hidden), "b1": (cfg.hidden,),
            "w2": (cfg.hidden, cfg.d_out), "b2": (cfg.d_out,),
        }  # fmt: skip
        for name, shape in shapes.items():
            layout = Layout(list(SPECS[name]) + [None] * (len(shape) - len(SPECS[name])), mesh)
            setattr(self, name, dcheckpoint.Variable(np.zeros(shape, np.float32), layout))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name).value for name in SPECS}

    def assign(self, values: dict[str, jax.Array]) -> None:
        for name, value in values.items():
            getattr(self, name).assign(value)


class Adam(dcheckpoint.AutoTrackable):
    """Adam's state: step count and first/second moments shaped and laid out like ``model``."""

    def __init__(self, mesh: Mesh, model: Model):
        self.count = dcheckpoint.Variable(np.int32(0), Layout.replicated(mesh, 0))
        self.mu = {n: _zeros_like(getattr(model, n)) for n in SPECS}
        self.nu = {n: _zeros_like(getattr(model, n)) for n in SPECS}


def _zeros_like(variable: dcheckpoint.Variable) -> dcheckpoint.Variable:
    return dcheckpoint.Variable(np.zeros(variable.shape, np.float32), variable.layout)


def initial_params(cfg: Config) -> dict[str, np.ndarray]:
    """Deterministic initial parameters (from ``cfg.seed`` only, never from the mesh)."""
    rng = np.random.default_rng([cfg.seed, 1])
    return {
        "w1": (rng.standard_normal((cfg.d_in, cfg.hidden)) / np.sqrt(cfg.d_in)).astype(np.float32),
        "b1": np.zeros(cfg.hidden, np.float32),
        "w2": (rng.standard_normal((cfg.hidden, cfg.d_out)) / np.sqrt(cfg.hidden)).astype(
            np.float32
        ),
        "b2": np.zeros(cfg.d_out, np.float32),
    }


def global_batch(cfg: Config, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch number ``position`` of the synthetic stream: a function of (seed, position).

    Targets come from a fixed random "teacher" network, so the loss can really go down.
    """
    teacher = np.random.default_rng([cfg.seed, 2]).standard_normal((cfg.d_in, cfg.d_out))
    x = np.random.default_rng([cfg.seed, 3, position]).standard_normal((cfg.batch, cfg.d_in))
    return x.astype(np.float32), np.sin(x @ teacher).astype(np.float32)


def _fixed_sum(parts: jax.Array) -> jax.Array:
    """Sums along axis 0 left to right: the same rounding whatever the mesh."""
    return functools.reduce(jnp.add, [parts[i] for i in range(parts.shape[0])])


def _local_grads(cfg: Config, params, x, y):
    """One device's share of loss and gradients (inside ``shard_map``); see the module doc.

    Local shapes: x [B/d, D], w1 [D, H/m], w2 [H/m, O]. ``g`` indexes this device's batch
    groups, ``k`` its hidden blocks; every einsum contracts a fixed-length dimension.
    """
    group, block = cfg.batch // BATCH_GROUPS, cfg.hidden // HIDDEN_BLOCKS
    xg = x.reshape(-1, group, cfg.d_in)  # [g, b, D]
    yg = y.reshape(-1, group, cfg.d_out)
    w1 = params["w1"].reshape(cfg.d_in, -1, block).transpose(1, 0, 2)  # [k, D, h]
    b1 = params["b1"].reshape(-1, 1, block)  # [k, 1, h]
    w2 = params["w2"].reshape(-1, block, cfg.d_out)  # [k, h, O]
    pre = _contract("gbd,kdh->gkbh", xg, w1) + b1
    hidden = jax.nn.relu(pre)
    partial = _contract("gkbh,kho->gkbo", hidden, w2)  # one partial output per block
    blocks = jax.lax.all_gather(partial, "model", axis=1, tiled=True)  # [g, K, b, O]
    err = _fixed_sum(blocks.transpose(1, 0, 2, 3)) + params["b2"] - yg  # [g, b, O]
    scale = 1.0 / (cfg.batch * cfg.d_out)
    loss = _sum_over_groups(jnp.sum(err * err, axis=(1, 2))) * scale
    d_out = 2.0 * scale * err
    d_pre = _contract("gbo,kho->gkbh", d_out, w2) * (pre > 0)
    grads = {
        "w1": _sum_over_groups(_contract("gbd,gkbh->gkdh", xg, d_pre)),
        "b1": _sum_over_groups(jnp.sum(d_pre, axis=2)),
        "w2": _sum_over_groups(_contract("gkbh,gbo->gkho", hidden, d_out)),
        "b2": _sum_over_groups(jnp.sum(d_out, axis=1)),
    }
    grads["w1"] = grads["w1"].transpose(1, 0, 2).reshape(cfg.d_in, -1)
    grads["b1"] = grads["b1"].reshape(-1)
    grads["w2"] = grads["w2"].reshape(-1, cfg.d_out)
    return grads, loss


def _contract(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` with one contracted letter, as a broadcast product and a ``sum``.

    A matmul kernel may order its additions by the operands' full shapes, which differ
    from mesh to mesh (a device holds 2 hidden blocks on one, 4 on another); a sum over
    one fixed-length axis adds each output element's terms the same way on every mesh.
    """
    inputs, out = spec.split("->")
    left, right = inputs.split(",")
    (summed,) = (set(left) & set(right)) - set(out)
    full = out + summed
    product = _expand(a, left, full) * _expand(b, right, full)
    return jnp.sum(product, axis=-1)


def _expand(x: jax.Array, letters: str, full: str) -> jax.Array:
    """``x`` (axes named by ``letters``) transposed and broadcastable to ``full``."""
    order = [letters.index(c) for c in full if c in letters]
    x = x.transpose(order)
    present = [c for c in full if c in letters]
    return x.reshape([x.shape[present.index(c)] if c in letters else 1 for c in full])


def _sum_over_groups(per_group: jax.Array) -> jax.Array:
    """Gathers every batch group's partial over ``data`` and adds them in a fixed order."""
    return _fixed_sum(jax.lax.all_gather(per_group, "data", axis=0, tiled=True))


def make_train_step(mesh: Mesh, cfg: Config):
    """Returns ``step(params, mu, nu, count, x, y) -> (params, mu, nu, count, loss)``, jitted.

    Raises:
        ValueError: the mesh's axes do not divide the fixed batch groups / hidden blocks.
    """
    data, model = mesh.shape["data"], mesh.shape["model"]
    if BATCH_GROUPS % data or HIDDEN_BLOCKS % model:
        raise ValueError(
            f"mesh {mesh.shape} must have a data axis dividing {BATCH_GROUPS} and a model "
            f"axis dividing {HIDDEN_BLOCKS}, so every device holds whole groups and blocks"
        )
    grads_fn = jax.shard_map(
        functools.partial(_local_grads, cfg),
        mesh=mesh.jax_mesh,
        in_specs=(SPECS, P("data", None), P("data", None)),
        out_specs=(SPECS, P()),
        # The outputs are replicated where out_specs say so (every copy is summed from
        # the same gathered partials in the same order); JAX cannot prove it statically.
        check_vma=False,
    )

    def step(params, mu, nu, count, x, y):
        grads, loss = grads_fn(params, x, y)
        count = count + 1
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: cfg.beta1 * m + (1 - cfg.beta1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: cfg.beta2 * v + (1 - cfg.beta2) * g * g, nu, grads)
        lr = cfg.learning_rate * jnp.sqrt(1 - cfg.beta2**t) / (1 - cfg.beta1**t)
        params = jax.tree.map(
            lambda p, m, v: p - lr * m / (jnp.sqrt(v) + cfg.eps), params, mu, nu
        )
        return params, mu, nu, count, loss

    shardings = {n: NamedSharding(mesh.jax_mesh, s) for n, s in SPECS.items()}
    scalar = NamedSharding(mesh.jax_mesh, P())
    return jax.jit(step, out_shardings=(shardings, shardings, shardings, scalar, scalar))


def device_batch(mesh: Mesh, cfg: Config, position: int) -> tuple[jax.Array, jax.Array]:
    """Batch ``position`` as global arrays split over ``data``; each process fills its shards."""
    sharding = NamedSharding(mesh.jax_mesh, P("data", None))
    x, y = global_batch(cfg, position)
    return tuple(
        jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
        for a in (x, y)
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=60, help="train until this step")
    parser.add_argument("--save-every", type=int, default=10, help="steps between saves")
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument("--mesh", default="4x2", help="DATAxMODEL, e.g. 4x2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--step-sleep", type=float, default=0.0,
        help="seconds to sleep after each step (stands in for a heavier model, so an "
        "outside preemption can land mid-run)",
    )  # fmt: skip
    parser.add_argument("--final-out", help="write the final parameters here (.npz, process 0)")
    parser.add_argument(
        "--save-on-preemption", action="store_true",
        help="on SIGTERM (a preemption notice), save at the step every process agrees on "
        "and exit 0",
    )  # fmt: skip
    parser.add_argument("--local-dir", help="local tier: HOST directories live here, "
                        "one per host (host<N>), e.g. on /dev/shm")
    parser.add_argument("--local-every", type=int, default=2, help="steps between local saves")
    parser.add_argument("--host-order", help="which host directory each rank gets, e.g. "
                        "'1,0' (default: rank N gets host<N>); a restart may renumber")
    return parser.parse_args(argv)


def log(message: str) -> None:
    if INFO.process_index == 0:
        print(f"[train] {message}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Trains to ``--steps``, resuming from ``--dir`` if it holds a checkpoint."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = Config(seed=args.seed)
    data_size, model_size = (int(n) for n in args.mesh.lower().split("x"))
    mesh = Mesh(("data", "model"), (data_size, model_size))
    pids = multihost_utils.process_allgather(np.int32(os.getpid()))
    log(f"pids {' '.join(str(int(p)) for p in np.ravel(pids))}")  # for an outside killer
    log(f"{INFO.process_count} process(es) x {len(mesh.local_devices)} devices, mesh {mesh.shape}")

    model, step = Model(mesh, cfg), dcheckpoint.Variable(np.int32(0), Layout.replicated(mesh, 0))
    optimizer = Adam(mesh, model)
    data = {"seed": np.int32(cfg.seed), "position": np.int32(0)}
    ckpt = dcheckpoint.DTensorCheckpoint(
        mesh, model=model, optimizer=optimizer, step=step, data=data
    )
    manager = dcheckpoint.CheckpointManager(
        ckpt, args.dir, max_to_keep=args.max_to_keep, step_counter=step,
        checkpoint_interval=args.save_every,
        init_fn=lambda: model.assign(initial_params(cfg)),
        save_on_preemption=args.save_on_preemption, **_local_tier(args),
    )  # fmt: skip
    restored = manager.restore_or_initialize()
    data = ckpt.data  # a restore rebuilds numpy leaves as arrays and re-assigns the dict
    if int(data["seed"]) != cfg.seed:
        raise ValueError(f"checkpoint was trained with seed {int(data['seed'])}, not {cfg.seed}")
    start = int(step.value)
    log(f"restored {restored} ({manager.restored_from}) at step {start}" if restored
        else "no checkpoint: initialised")
    train_step = make_train_step(mesh, cfg)
    options = dcheckpoint.CheckpointOptions(enable_async=True)
    committed, loss = manager.latest_checkpoint, None
    for s in range(start, args.steps):
        x, y = device_batch(mesh, cfg, int(data["position"]))
        params, mu, nu, count, loss = train_step(
            model.arrays(), _values(optimizer.mu), _values(optimizer.nu),
            optimizer.count.value, x, y,
        )  # fmt: skip
        model.assign(params)
        _assign(optimizer.mu, mu)
        _assign(optimizer.nu, nu)
        optimizer.count.assign(count)
        step.assign(np.int32(s + 1))
        data["position"] = np.int32(int(data["position"]) + 1)
        log(f"step {s + 1} loss {float(loss):.6f}")
        try:
            committed = _save(manager, s + 1, options, committed, final=s + 1 == args.steps)
        except SystemExit:  # save_on_preemption: the agreed step is saved and committed
            _log_commit(manager, committed)
            log(f"preempted: saved at step {manager.latest_step()}, exiting cleanly")
            raise
        _log_local(manager)
        time.sleep(args.step_sleep)
    manager.sync()
    _log_commit(manager, committed)
    _log_local(manager)
    return _finish(args, model, step, loss, restored, start,
                   manager.restored_from)


def _local_tier(args) -> dict:
    """The manager's local-tier arguments: this rank's host directory, if any."""
    if args.local_dir is None:
        return {}
    order = [int(h) for h in args.host_order.split(",")] if args.host_order else None
    host = order[INFO.process_index] if order else INFO.process_index
    return {"local_directory": os.path.join(args.local_dir, f"host{host}"),
            "local_every": args.local_every}


_LOGGED_LOCAL: set[int] = set()


def _log_local(manager) -> None:
    """Logs the local steps committed since the last call (process 0's directory)."""
    for local_step in manager.local_steps:
        if local_step not in _LOGGED_LOCAL:
            _LOGGED_LOCAL.add(local_step)
            log(f"local step {local_step} committed")


def _values(variables: dict) -> dict:
    return {name: v.value for name, v in variables.items()}


def _assign(variables: dict, values: dict) -> None:
    for name, value in values.items():
        variables[name].assign(value)


def _save(manager, step: int, options, committed, *, final: bool):
    """Starts an async save when due (the last step always saves); logs the blocking time."""
    started = time.perf_counter()
    path = manager.save(checkpoint_number=step, check_interval=not final, options=options)
    if path is not None:
        blocked_ms = (time.perf_counter() - started) * 1e3
        log(f"save {os.path.basename(path)} started, blocked {blocked_ms:.1f} ms (async)")
    return _log_commit(manager, committed)


def _log_commit(manager, committed):
    """Logs a checkpoint the background save has committed since the last call."""
    latest = manager.latest_checkpoint
    if latest != committed:
        log(f"committed {os.path.basename(latest)}")
    return latest


def _finish(args, model, step, loss, restored, start, tier=None) -> dict:
    """Gathers the final parameters; process 0 writes them and prints ``RESULT``."""
    params = {n: np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for n, v in model.arrays().items()}  # fmt: skip
    result = {
        "step": int(step.value),
        "start_step": start,
        "restored_from": restored,
        "restored_tier": tier,
        "loss": None if loss is None else float(loss),
        "loss_hex": None if loss is None else float(loss).hex(),
    }
    if INFO.process_index == 0:
        if args.final_out:
            np.savez(args.final_out, **params)
        print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
