"""The JAX user's own flows: abstract targets, step-numbered pytrees, one naming rule.

Each test is one row of issue 21's table, done as a user coming from Orbax does it
(``jax.eval_shape`` targets, ``TrainState.replace``, ``nnx.state``), plus a whole flax
nnx + optax + grain job killed and resumed on other meshes, bit for bit.
"""

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointOptions,
    PytreeManager,
    StaleStateWarning,
    Variable,
    read_metadata,
    restore_pytree,
    save_pytree,
    target_from_metadata,
)
from tests.mp_util import REPO_ROOT, results, run_launch

WORKER = REPO_ROOT / "tests" / "workers" / "nnx_flow_worker.py"


class Net(nnx.Module):
    def __init__(self, seed: int):
        rngs = nnx.Rngs(seed, dropout=seed + 1)
        self.dense = nnx.Linear(8, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


def _mesh(shape):
    return jax.make_mesh(shape, ("x", "y"), axis_types=(AxisType.Auto,) * 2)


def _same(a, b):
    """Bit-equal values, keys compared by their key data."""
    def data(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(data(x), data(y))


def test_eval_shape_target_with_prng_keys_restores_keys(tmp_path):
    state = {"model": nnx.state(Net(3))}
    path = save_pytree(str(tmp_path / "p"), state)
    abstract = jax.eval_shape(lambda: {"model": nnx.state(Net(0))})
    restored = restore_pytree(path, abstract)
    key = restored["model"]["drop"]["rngs"]["key"].get_value()
    assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and isinstance(key, jax.Array)
    _same(restored, state)


def test_eval_shape_of_python_scalars_takes_the_saved_int_and_float(tmp_path):
    # eval_shape makes weakly typed int32/float32 of Python scalars; the saved int64 and
    # float64 must still restore (the dtype is JAX's default, not the user's choice).
    state = {"count": 3, "lr": 0.25, "w": jnp.ones(2)}
    path = save_pytree(str(tmp_path / "p"), state)
    restored = restore_pytree(path, jax.eval_shape(lambda: state))
    assert int(restored["count"]) == 3 and float(restored["lr"]) == 0.25
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(2))
    with pytest.raises(CheckpointMismatchError, match=r"'w': restore target has dtype int32"):
        restore_pytree(path, {**state, "w": jax.ShapeDtypeStruct((2,), jnp.int32)})


def test_eval_shape_target_on_an_abstract_mesh_takes_the_set_mesh(tmp_path):
    mesh = jax.make_mesh((4, 2), ("x", "y"))  # explicit axes: eval_shape keeps shardings
    tree = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh, P("x"))),
            "k": jax.random.split(jax.random.key(1), 4)}
    path = save_pytree(str(tmp_path / "p"), tree)
    abstract = jax.eval_shape(lambda: tree)
    with pytest.raises(CheckpointMismatchError, match=r"'w'.*abstract mesh.*jax.set_mesh"):
        restore_pytree(path, abstract)
    with jax.set_mesh(mesh):
        restored = restore_pytree(path, abstract)
    assert restored["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 2)
    _same(restored, tree)
    # No sharding at all: what the abstracted function returns, a jax.Array.
    plain = restore_pytree(path, jax.eval_shape(lambda: {"w": jnp.zeros((8, 2)),
                                                         "k": jax.random.split(
                                                             jax.random.key(0), 4)}))
    assert isinstance(plain["w"], jax.Array) and not plain["w"].committed
    _same(plain, tree)


def test_target_from_metadata_gives_keys_that_restore(tmp_path):
    keys = jax.device_put(jax.random.split(jax.random.key(5), 8),
                          NamedSharding(_mesh((4, 2)), P("x")))
    path = save_pytree(str(tmp_path / "p"), {"keys": keys, "rbg": jax.random.key(2, impl="rbg")})
    target = target_from_metadata(path, _mesh((2, 4)))
    assert target["keys"].dtype == keys.dtype and target["keys"].shape == (8,)
    assert target["keys"].sharding.spec == P("x")
    restored = restore_pytree(path, target)
    assert restored["keys"].sharding.mesh.shape == {"x": 2, "y": 4}
    assert str(jax.random.key_impl(restored["rbg"])) == "rbg"
    _same(restored["keys"], keys)


def test_checkpoint_fills_abstract_modules_and_refuses_unfilled_placeholders(tmp_path):
    model = Net(3)
    path = Checkpoint(model=model, extra={"w": jnp.ones(3)}).save(str(tmp_path / "c"))
    abstract = nnx.eval_shape(lambda: Net(0))
    Checkpoint(model=abstract).restore(path).expect_partial()
    assert isinstance(abstract.dense.kernel.get_value(), jax.Array)
    _same(nnx.state(abstract), nnx.state(model))
    # A placeholder the checkpoint has no value for is an error, before any assignment.
    target = jax.eval_shape(lambda: {"w": jnp.ones(3), "new": jnp.ones(2)})
    ckpt = Checkpoint(extra=target)
    with pytest.raises(CheckpointMismatchError, match=r"\['extra/new'\]: abstract placeholders"):
        ckpt.restore(path)
    assert isinstance(ckpt.extra["w"], jax.ShapeDtypeStruct)  # nothing was assigned
    # Saving a placeholder names it.
    with pytest.raises(ValueError, match=r"'extra/(new|w)': a jax.ShapeDtypeStruct is an abstract"):
        ckpt.save(str(tmp_path / "bad"))


def test_manager_restores_into_abstract_state(tmp_path):
    ts = train_state.TrainState.create(apply_fn=None, params={"w": jnp.arange(3.0)},
                                       tx=optax.adam(0.1))
    CheckpointManager(Checkpoint(state=ts), tmp_path, max_to_keep=1).save()
    ckpt = Checkpoint(state=jax.eval_shape(lambda: ts))
    assert CheckpointManager(ckpt, tmp_path, max_to_keep=1).restore_or_initialize()
    np.testing.assert_array_equal(ckpt.state.params["w"], np.arange(3.0))
    assert isinstance(ckpt.state.opt_state[0].mu["w"], jax.Array)


def test_a_rebound_immutable_state_warns_and_an_assigned_one_does_not(tmp_path):
    state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)},
                                          tx=optax.sgd(0.1))
    ckpt = Checkpoint(state=state)
    manager = CheckpointManager(ckpt, tmp_path, max_to_keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleStateWarning)
        manager.save()
        ckpt.state = state.replace(step=1)  # only a Python int changed: a new object
        manager.save()
    state = ckpt.state.replace(step=2)  # the trap: the Checkpoint still holds step 1
    with pytest.warns(StaleStateWarning, match=r"\['state'\].*ckpt.state = new_state"):
        manager.save()
    assert state.step == 2 and restore_pytree(manager.latest_checkpoint)["state"]["step"] == 1


def test_nnx_state_names_are_the_same_for_both_apis_and_each_reads_the_other(tmp_path):
    model = Net(3)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    by_pytree = save_pytree(str(tmp_path / "p"), {"model": nnx.state(model),
                                                  "opt": nnx.state(optimizer)})
    by_ckpt = Checkpoint(model=model, opt=optimizer).write(str(tmp_path / "c"))
    names = set(read_metadata(by_pytree).arrays)
    assert "model/dense/kernel" in names and "opt/opt_state/0/mu/dense/kernel" in names
    assert names == set(read_metadata(by_ckpt).arrays)
    # Each API restores the other's checkpoint of the same model.
    other, other_opt = Net(0), None
    other_opt = nnx.Optimizer(other, optax.adam(1e-2), wrt=nnx.Param)
    Checkpoint(model=other, opt=other_opt).restore(by_pytree).assert_consumed()
    _same(nnx.state(other), nnx.state(model))
    restored = restore_pytree(by_ckpt, {"model": nnx.state(Net(1))})
    _same(restored["model"], nnx.state(model))


def test_save_pytree_names_from_before_the_rule_still_restore(tmp_path):
    from dcheckpoint._engine import save_arrays

    state = nnx.state(Net(3))
    old_names = {f"{p}/value": v for p, v in
                 dcheckpoint._pytree.pytree_arrays({"m": state})[0].items()}
    path = save_arrays(str(tmp_path / "old"), old_names,
                       object_graph={"kind": "pytree", "leaves": sorted(old_names)})
    restored = restore_pytree(path, {"m": nnx.state(Net(0))})
    _same(restored["m"], state)


def test_save_pytree_refuses_async_and_names_the_async_door(tmp_path):
    with pytest.raises(ValueError, match="saves synchronously.*PytreeManager"):
        save_pytree(str(tmp_path / "p"), {"x": jnp.ones(2)},
                    options=CheckpointOptions(enable_async=True))
    assert not (tmp_path / "p").exists()


def test_steps_are_training_steps_with_a_step_counter_and_interval(tmp_path):
    step = Variable(jnp.array(0))
    weights = Variable(jnp.zeros(2))
    manager = CheckpointManager(Checkpoint(step=step, w=weights), tmp_path, max_to_keep=5,
                                step_counter=step, checkpoint_interval=3)
    for s in range(1, 8):
        step.assign(jnp.array(s))
        weights.assign(jnp.full(2, float(s)))
        manager.save()
    # TF names the checkpoints by save number; the steps are the ones they were saved at.
    assert [p.rsplit("/", 1)[-1] for p in manager.checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert manager.all_steps() == [1, 4, 7] and manager.latest_step() == 7
    manager.restore(4)
    np.testing.assert_array_equal(weights.value, [4.0, 4.0])
    again = CheckpointManager(Checkpoint(step=step, w=weights), tmp_path, max_to_keep=5,
                              step_counter=step, checkpoint_interval=3)
    assert again.all_steps() == [1, 4, 7]
    # Step 2 was never saved: ckpt-2 (saved at step 4) is not it.
    with pytest.raises(CheckpointNotFoundError, match=r"step 2 .*none was saved at that step"):
        again.restore(2)
    with pytest.raises(CheckpointNotFoundError, match=r"step 2 .*available steps: \[1, 4, 7\]"):
        again.delete(2)
    again.delete(4)
    assert again.all_steps() == [1, 7]


def test_metadata_takes_jax_and_numpy_scalars(tmp_path):
    manager = PytreeManager(tmp_path)
    loss = jax.jit(lambda x: jnp.mean(x))(jnp.arange(4.0))
    manager.save(1, {"x": jnp.ones(2)}, metadata={"loss": loss, "n": np.int64(3),
                                                  "acc": np.float32(0.5)})
    assert manager.metadata(1) == {"loss": 1.5, "n": 3, "acc": 0.5, "step": 1}
    with pytest.raises(ValueError, match=r"metadata\['loss'\]: nan is not a finite number"):
        manager.save(2, {"x": jnp.ones(2)}, metadata={"loss": jnp.float32(jnp.nan)})
    assert manager.all_steps() == [1]


def test_pytree_manager_numbers_by_step_and_keeps_the_newest(tmp_path):
    options = CheckpointOptions(enable_async=True)
    with PytreeManager(tmp_path, max_to_keep=2, save_interval_steps=2,
                       options=options) as manager:
        for s in range(1, 8):
            path = manager.save(s, {"w": jnp.full(3, float(s)), "n": [s]})
            assert (path is None) == (s % 2 == 1)
        assert manager.restore()["w"].tolist() == [6.0, 6.0, 6.0]  # waits for the save
        assert manager.all_steps() == [4, 6] and manager.latest_step() == 6
        assert manager.save(7, {"w": jnp.ones(3), "n": [7]}, force=True)
        as_saved = manager.restore(7)
        assert as_saved["n"] == [7] and isinstance(as_saved["w"], np.ndarray)
        with pytest.raises(CheckpointNotFoundError, match=r"step 2 .*available steps: \[6, 7\]"):
            manager.restore(2)
        with pytest.raises(TypeError, match="step must be an int"):
            manager.save(7.5, {"w": jnp.ones(3)})
    # A new manager picks the directory up; checkpoints_iterator follows it.
    again = PytreeManager(tmp_path, max_to_keep=2)
    assert again.all_steps() == [6, 7]
    assert next(dcheckpoint.checkpoints_iterator(tmp_path, timeout=0)).endswith("ckpt-7")
    again.delete(6)
    assert again.all_steps() == [7]
    again.close()


def test_checkpoint_restores_a_savedmodels_params(tmp_path):
    from tests.test_exporting import make_model

    manager, w, b = make_model(tmp_path)
    w.assign(w.value + 3.0)
    manager.save()
    new_w, new_b = Variable(np.zeros((4, 8), np.float32)), [np.zeros(8, np.float32)]
    status = Checkpoint(w=new_w, b=new_b, opt=Variable(np.zeros(2))).restore(
        manager.latest_savedmodel)
    np.testing.assert_array_equal(new_w.numpy(), np.asarray(w.value))
    np.testing.assert_array_equal(new_b[0], np.asarray(b.value))
    with pytest.raises(AssertionError, match=r"no value in the checkpoint: \['opt'\]"):
        status.assert_consumed()
    status.expect_partial()


@pytest.fixture(scope="module")
def killed_jobs(tmp_path_factory):
    """An uninterrupted run, and one killed run per API, on a (4, 2) mesh."""
    root = tmp_path_factory.mktemp("nnx_jobs")
    reference = results(run_launch(WORKER, "--dir", root / "ref", "--api", "pytree",
                                   processes=1, devices_per_process=8))[0]
    for api in ("pytree", "object"):
        killed = run_launch(WORKER, "--dir", root / api, "--api", api, "--kill-after", 10,
                            processes=1, devices_per_process=8, check=False)
        assert killed.returncode != 0 and "RESULT" not in killed.stdout
    return root, reference


@pytest.mark.parametrize("api", ["pytree", "object"])
@pytest.mark.parametrize("mesh", ["2x4", "1"])
def test_nnx_optax_grain_job_resumes_bit_identical_on_another_mesh(killed_jobs, api, mesh,
                                                                   tmp_path):
    root, reference = killed_jobs
    directory = tmp_path / "resume"
    shutil.copytree(root / api, directory)
    resumed = results(run_launch(WORKER, "--dir", directory, "--api", api, "--mesh", mesh,
                                 processes=1, devices_per_process=8))[0]
    assert resumed["resumed_from"] is not None and 1 <= resumed["resumed_from"] <= 10
    expected = "SingleDevice" if mesh == "1" else "'x': 2, 'y': 4"
    assert expected in resumed["placed_on"]
    assert resumed["digest"] == reference["digest"]
    assert resumed["loss"] == reference["loss"]


def test_pytree_manager_across_two_processes(tmp_path):
    completed = run_launch(REPO_ROOT / "tests" / "workers" / "pytree_manager_worker.py",
                           tmp_path, processes=2, devices_per_process=4)
    ranks = results(completed)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["steps"] == [3, 4] and r["metadata"] == {"loss": 4.0, "step": 4}
        assert r["w_ok"] and r["w_mesh"] == {"x": 2, "y": 4}
        assert r["key"] == r["expected_key"]
        # Steps 10 and 11: refused on both processes, nothing written.
        assert r["mismatch"].startswith("CoordinationError") and "ckpt-1" in r["mismatch"]
        assert r["steps_after"] == [3, 4]
