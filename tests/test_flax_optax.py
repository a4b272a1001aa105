"""Real flax (nnx and linen TrainState) and optax state through both APIs.

Saved on a (4, 2) mesh of the 8 emulated CPU devices, restored on (2, 4) and on one
device. What a new JAX user does, checked value by value: a module restored in place
(the user's own object holds the weights, a forward pass gives the saved output), a
TrainState whose ``step`` is a Python int, optax states, nnx ``Rngs`` keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dcheckpoint import Checkpoint, DTensorCheckpoint, restore_pytree, save_pytree


class Net(nnx.Module):
    def __init__(self, seed: int):
        rngs = nnx.Rngs(seed, dropout=seed + 1)
        self.dense = nnx.Linear(8, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.drop(self.dense(x)))


def _mesh(shape):
    # Auto axes: the model's ops follow the arrays' shardings (no sharding-in-types).
    return jax.make_mesh(shape, ("x", "y"), axis_types=(AxisType.Auto,) * 2)


def _spec(x, mesh):
    """Shard dim 0 over x and dim 1 over y where they divide; keys and scalars replicate."""
    axes = [a for a, d in zip(("x", "y"), getattr(x, "shape", ()), strict=False)
            if d % mesh.shape[a] == 0]
    return NamedSharding(mesh, P(*axes))


def _place(model, mesh):
    """Puts every nnx Variable of ``model`` on ``mesh`` (None: one device)."""
    state = nnx.state(model)
    if mesh is None:
        placed = jax.device_put(state, jax.devices()[0])
    else:
        placed = jax.tree.map(lambda x: jax.device_put(x, _spec(x, mesh)), state)
    nnx.update(model, placed)
    return model


def _train_step(model, optimizer, x):
    def loss(m):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)


X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)


@pytest.mark.parametrize("target_mesh", [(2, 4), None], ids=["mesh2x4", "one-device"])
def test_nnx_module_and_optimizer_restore_in_place(tmp_path, target_mesh):
    source = _mesh((4, 2))
    model = _place(Net(0), source)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    _train_step(model, optimizer, X)
    _train_step(model, optimizer, X)
    path = DTensorCheckpoint(source, model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt"))
    # What the model does next: eval uses the saved BatchNorm statistics; train mode
    # draws dropout masks from the saved Rngs (and then updates the statistics).
    model.eval()
    expected_eval = np.asarray(model(X))
    model.train()
    expected_train = np.asarray(model(X))
    expected_kernel = np.asarray(model.dense.kernel[...])
    expected_mu = np.asarray(optimizer.opt_state[0].mu["dense"]["kernel"][...])

    mesh = _mesh(target_mesh) if target_mesh else None
    fresh = _place(Net(7), mesh)  # other weights, other keys
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=nnx.Param)
    kernel_var = fresh.dense.kernel
    sharding = kernel_var[...].sharding
    ckpt = DTensorCheckpoint(mesh or source, model=fresh, optimizer=fresh_opt)
    ckpt.restore(path).assert_consumed()

    # The user's own objects hold the values (not only ckpt.model), placed as they were.
    assert ckpt.model is fresh and fresh.dense.kernel is kernel_var
    np.testing.assert_array_equal(np.asarray(fresh.dense.kernel[...]), expected_kernel)
    assert fresh.dense.kernel[...].sharding == sharding
    np.testing.assert_array_equal(
        np.asarray(fresh_opt.opt_state[0].mu["dense"]["kernel"][...]), expected_mu)
    assert int(fresh_opt.step[...]) == 2
    # Same weights; another mesh sums in another order, hence float32 rounding only.
    fresh.eval()
    np.testing.assert_allclose(np.asarray(fresh(X)), expected_eval, rtol=1e-5, atol=1e-6)
    fresh.train()
    np.testing.assert_allclose(np.asarray(fresh(X)), expected_train, rtol=1e-5, atol=1e-6)


def test_nnx_rngs_keys_round_trip_typed(tmp_path):
    rngs = nnx.Rngs(3, dropout=4)
    rngs.dropout()  # advance a stream: its count is state too
    path = Checkpoint(rngs=rngs).save(str(tmp_path / "ckpt"))
    saved = {name: (jax.random.key_data(s.key[...]), int(s.count[...]))
             for name, s in (("default", rngs.default), ("dropout", rngs.dropout))}
    expected_draw = jax.random.key_data(rngs.dropout())

    fresh = nnx.Rngs(10, dropout=11)
    Checkpoint(rngs=fresh).restore(path).assert_consumed()
    for name, stream in (("default", fresh.default), ("dropout", fresh.dropout)):
        key = stream.key[...]
        assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(key), saved[name][0])
        assert int(stream.count[...]) == saved[name][1]
    np.testing.assert_array_equal(jax.random.key_data(fresh.dropout()), expected_draw)


def _linen_state(seed: int, mesh=None):
    model = linen.Dense(4)
    params = model.init(jax.random.key(seed), jnp.ones((1, 8)))
    if mesh is not None:
        params = jax.tree.map(lambda x: jax.device_put(x, _spec(x, mesh)), params)
    return train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


def _steps(state, n):
    apply_fn = state.apply_fn

    @jax.jit
    def grads_of(params):
        return jax.grad(lambda p: jnp.mean(apply_fn(p, X) ** 2))(params)

    for _ in range(n):
        # Eager apply_gradients keeps ``step`` a Python int, as in many training loops.
        state = state.apply_gradients(grads=grads_of(state.params))
    return state


@pytest.mark.parametrize("target_mesh", [(2, 4), None], ids=["mesh2x4", "one-device"])
def test_linen_train_state_python_int_step(tmp_path, target_mesh):
    source = _mesh((4, 2))
    state = _steps(_linen_state(0, source), 3)
    assert type(state.step) is int and state.step == 3
    path = DTensorCheckpoint(source, ts=state).save(str(tmp_path / "ckpt"))

    mesh = _mesh(target_mesh) if target_mesh else None
    fresh = _linen_state(1, mesh)
    ckpt = DTensorCheckpoint(mesh or source, ts=fresh)
    ckpt.restore(path).assert_consumed()
    restored = ckpt.ts  # immutable: the Checkpoint holds the rebuilt state
    assert type(restored.step) is int and restored.step == 3
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(restored.opt_state[0].count) == 3
    np.testing.assert_array_equal(
        np.asarray(restored.opt_state[0].mu["params"]["kernel"]),
        np.asarray(state.opt_state[0].mu["params"]["kernel"]))
    # Placed like the target, and training continues from there.
    kernel = restored.params["params"]["kernel"]
    assert kernel.sharding.is_equivalent_to(
        fresh.params["params"]["kernel"].sharding, kernel.ndim)
    assert _steps(restored, 1).step == 4


def test_train_state_through_save_pytree(tmp_path):
    state = _steps(_linen_state(0, _mesh((4, 2))), 2)
    save_pytree(str(tmp_path / "tree"), state)
    fresh = _linen_state(1, _mesh((2, 4)))
    restored = restore_pytree(str(tmp_path / "tree"), fresh)
    assert type(restored.step) is int and restored.step == 2
    np.testing.assert_array_equal(
        np.asarray(restored.params["params"]["kernel"]),
        np.asarray(state.params["params"]["kernel"]))


def test_optax_state_and_nnx_state_replaced_on_checkpoint(tmp_path):
    params = {"w": jnp.arange(16.0).reshape(8, 2)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(params)
    _, opt_state = tx.update({"w": jnp.ones((8, 2))}, opt_state, params)
    model = Net(0)
    path = Checkpoint(opt=opt_state, state=nnx.state(model)).save(str(tmp_path / "ckpt"))

    fresh_model = Net(5)
    ckpt = Checkpoint(opt=tx.init(params), state=nnx.state(fresh_model))
    ckpt.restore(path).assert_consumed()
    got = jax.tree.leaves(ckpt.opt)
    for a, b in zip(got, jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # nnx.State holds the module's own Variables: they are assigned in place, so the
    # module sees the restored weights too (nnx.update(model, ckpt.state) also works).
    np.testing.assert_array_equal(
        np.asarray(fresh_model.dense.kernel[...]), np.asarray(model.dense.kernel[...]))


def test_readme_flax_example_runs(tmp_path):
    from tests.mp_util import REPO_ROOT
    from tests.readme_example import run_readme_example

    _, done = run_readme_example("nnx.Linear", tmp_path, "/tmp/readme-flax", tmp_path,
                                 env={"PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
