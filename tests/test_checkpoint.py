"""Checkpoint and its load status, one TensorFlow rule per test, on real files."""

import gc
import os
import warnings
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcheckpoint
from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._status import CheckpointAssertionError
from dcheckpoint._tracking import AutoTrackable
from dcheckpoint._variable import Variable
from dcheckpoint.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError


class Dense(AutoTrackable):
    def __init__(self, fill=0.0):
        self.kernel = Variable(jnp.full((3, 2), fill, jnp.float32))
        self.bias = Variable(jnp.full((2,), fill, jnp.float32))


class Model(AutoTrackable):
    def __init__(self, fill=0.0):
        self.dense = Dense(fill)


class AdamState(NamedTuple):  # optax.ScaleByAdamState's shape
    count: jax.Array
    mu: dict
    nu: dict


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_save_numbers_and_counter(tmp_path):
    ckpt = Checkpoint(model=Model(1.0))
    prefix = str(tmp_path / "ckpt")
    assert ckpt.save(prefix) == prefix + "-1"
    assert ckpt.save(prefix) == prefix + "-2"
    assert int(ckpt.save_counter.numpy()) == 2
    fresh = Checkpoint(model=Model())
    fresh.restore(prefix + "-1").assert_consumed()
    assert int(fresh.save_counter.numpy()) == 1
    np.testing.assert_array_equal(fresh.model.dense.kernel.numpy(), np.ones((3, 2)))


def test_write_and_read_leave_counter_alone(tmp_path):
    model = Model(2.0)
    ckpt = Checkpoint(model=model)
    path = str(tmp_path / "exact")
    assert ckpt.write(path) == path
    assert ckpt._dc_counter is None  # write creates no counter, as in TF
    model.dense.kernel.assign(jnp.zeros((3, 2)))
    ckpt.read(path).assert_consumed()
    assert ckpt._dc_counter is None
    np.testing.assert_array_equal(model.dense.kernel.numpy(), np.full((3, 2), 2.0))


def test_restore_of_write_output_reports_save_counter(tmp_path):
    path = Checkpoint(model=Model(3.0)).write(str(tmp_path / "w"))
    model = Model()
    status = Checkpoint(model=model).restore(path)
    np.testing.assert_array_equal(model.dense.bias.numpy(), np.full((2,), 3.0))
    status.assert_nontrivial_match()
    with pytest.raises(AssertionError, match=r"no value in the checkpoint: \['save_counter'\]"):
        status.assert_consumed()


def test_assert_consumed_fails_on_extra_checkpoint_value(tmp_path):
    saved = Model()
    saved.head = Variable(jnp.ones(4))
    path = Checkpoint(model=saved).save(str(tmp_path / "c"))
    status = Checkpoint(model=Model()).restore(path)
    status.assert_existing_objects_matched()
    with pytest.raises(CheckpointAssertionError, match=r"Unused checkpoint.*\['model/head'\]"):
        status.assert_consumed()
    status.expect_partial()


def test_assert_consumed_fails_on_missing_object(tmp_path):
    path = Checkpoint(model=Model()).save(str(tmp_path / "c"))
    model = Model()
    model.extra = Variable(jnp.ones(4))
    status = Checkpoint(model=model).restore(path)
    with pytest.raises(CheckpointError, match=r"no value in the checkpoint: \['model/extra'\]"):
        status.assert_consumed()
    with pytest.raises(AssertionError, match=r"\['model/extra'\]"):
        status.assert_existing_objects_matched()


def test_deferred_restore_on_attach(tmp_path):
    path = Checkpoint(model=Model(5.0)).save(str(tmp_path / "c"))
    model = AutoTrackable()
    status = Checkpoint(model=model).restore(path)
    with pytest.raises(AssertionError, match="model/dense/bias"):
        status.assert_consumed()
    model.dense = Dense()  # restored now, from the checkpoint
    np.testing.assert_array_equal(model.dense.kernel.numpy(), np.full((3, 2), 5.0))
    status.assert_consumed()  # the status is live


def test_deferred_restore_of_top_level_attribute(tmp_path):
    path = Checkpoint(step=np.int64(7)).save(str(tmp_path / "c"))
    ckpt = Checkpoint()
    ckpt.restore(path).expect_partial()  # dropped before the attach
    ckpt.step = np.int64(0)
    assert ckpt.step == 7 and isinstance(ckpt.step, np.int64)


def test_flax_style_params_round_trip_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Dense_0": {
                "kernel": jnp.asarray(rng.standard_normal((4, 3))),
                "bias": jnp.asarray(rng.standard_normal(3)),
            },
            "LayerNorm/scale": np.float32(rng.standard_normal()),
        }
    }
    expected = _bits(params)
    path = Checkpoint(params=params).save(str(tmp_path / "c"))
    target = jax.tree.map(jnp.zeros_like, params)
    Checkpoint(params=target).restore(path).assert_consumed()
    assert _bits(target) == expected  # dicts updated in place, "/" in a key escaped


def test_optax_style_namedtuple_state_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    mu = {"w": jnp.asarray(rng.standard_normal((2, 2)), jnp.bfloat16)}
    state = (AdamState(jnp.asarray(3, jnp.int32), mu, {"w": jnp.ones((2, 2))}), None)
    expected = _bits(state)
    path = Checkpoint(opt_state=state).save(str(tmp_path / "c"))
    ckpt = Checkpoint(opt_state=jax.tree.map(jnp.zeros_like, state))
    ckpt.restore(path).assert_consumed()
    assert isinstance(ckpt.opt_state[0], AdamState)  # rebuilt and re-assigned
    assert ckpt.opt_state[0].mu["w"].dtype == jnp.bfloat16
    assert _bits(ckpt.opt_state) == expected


def test_shared_object_saved_once_restored_everywhere(tmp_path):
    shared = Variable(jnp.arange(3.0))
    a, b = AutoTrackable(), AutoTrackable()
    a.v, b.v = shared, shared
    path = Checkpoint(a=a, b=b).save(str(tmp_path / "c"))
    from dcheckpoint import _engine

    assert sorted(_engine.read_metadata(path).arrays) == ["a/v", "save_counter"]
    a2, b2 = AutoTrackable(), AutoTrackable()
    a2.v, b2.v = Variable(jnp.zeros(3)), Variable(jnp.zeros(3))  # no longer shared
    Checkpoint(a=a2, b=b2).restore(path).assert_consumed()
    np.testing.assert_array_equal(b2.v.numpy(), np.arange(3.0))


def test_root_and_kwargs(tmp_path):
    root = Model(4.0)
    extra = Variable(jnp.ones(2))
    path = Checkpoint(root, extra=extra).save(str(tmp_path / "c"))
    from dcheckpoint import _engine

    assert sorted(_engine.read_metadata(path).arrays) == [
        "dense/bias", "dense/kernel", "extra", "save_counter"]  # fmt: skip
    with pytest.raises(ValueError, match="keyword argument 'dense' if root.dense already"):
        Checkpoint(root, dense=Dense())
    Checkpoint(root, dense=root.dense)  # the same object is no conflict


def test_non_trackable_kwarg_rejected():
    with pytest.raises(ValueError, match="trackable object for 'act'.*got function"):
        Checkpoint(act=lambda x: x)
    with pytest.raises(ValueError, match="reserved"):
        Checkpoint(save_counter=Variable(jnp.zeros(())))


def test_restore_none_and_missing_path(tmp_path):
    status = Checkpoint(model=Model()).restore(None)
    assert status.expect_partial() is status
    with pytest.raises(AssertionError, match="save_path=None"):
        status.assert_consumed()
    with pytest.raises(CheckpointNotFoundError):
        Checkpoint(model=Model()).restore(str(tmp_path / "nothing-1"))
    with pytest.raises(FileNotFoundError):
        Checkpoint(model=Model()).read(str(tmp_path / "nothing"))


def test_shape_mismatch_names_path(tmp_path):
    path = Checkpoint(model=Model()).save(str(tmp_path / "c"))
    model = Model()
    model.dense.bias = Variable(jnp.zeros(5))
    with pytest.raises(CheckpointMismatchError, match=r"'model/dense/bias'.*\(5,\).*\(2,\)"):
        Checkpoint(model=model).restore(path)


def test_unused_values_warn_unless_expect_partial(tmp_path):
    saved = Model()
    saved.head = Variable(jnp.ones(4))
    path = Checkpoint(model=saved).save(str(tmp_path / "c"))
    with pytest.warns(UserWarning, match=r"never restored: \['model/head'\]"):
        Checkpoint(model=Model()).restore(path)
        gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Checkpoint(model=Model()).restore(path).expect_partial()
        gc.collect()


def test_restore_of_cyclic_graph_terminates(tmp_path):
    saved = AutoTrackable()
    saved.w, saved.me = np.ones(2), saved
    path = Checkpoint(a=saved).save(str(tmp_path / "c"))
    target = AutoTrackable()
    target.w, target.me = np.zeros(2), target
    Checkpoint(a=target).restore(path).assert_consumed()  # no RecursionError
    np.testing.assert_array_equal(target.w, np.ones(2))


def test_pending_restore_does_not_pin_replaced_values(tmp_path):
    # A value still pending (model.head) keeps the restore alive; it must not keep the
    # values the restore replaced (on a device: a second copy of the model in memory).
    saved = AutoTrackable()
    saved.params, saved.head = {"w": np.ones(3)}, Variable(jnp.ones(2))
    path = Checkpoint(m=saved).save(str(tmp_path / "c"))
    model, old = AutoTrackable(), np.zeros(3)
    model.params = {"w": old}
    replaced = weakref.ref(old)
    del old
    Checkpoint(m=model).restore(path).expect_partial()
    gc.collect()
    assert replaced() is None
    model.head = Variable(jnp.zeros(2))  # the pending restore still works
    np.testing.assert_array_equal(model.head.numpy(), np.ones(2))


def test_objects_no_longer_shared_keep_their_own_targets(tmp_path):
    shared = Variable(jnp.arange(3.0))
    a, b = AutoTrackable(), AutoTrackable()
    a.v, b.v = shared, shared
    path = Checkpoint(a=a, b=b).save(str(tmp_path / "c"))
    a2, b2 = AutoTrackable(), AutoTrackable()
    a2.v, b2.v = np.zeros(3, np.float32), Variable(jnp.zeros(3))
    Checkpoint(a=a2, b=b2).restore(path).assert_consumed()
    assert type(a2.v) is np.ndarray  # a host leaf, not b2.v's device target
    np.testing.assert_array_equal(a2.v, np.arange(3.0))
    np.testing.assert_array_equal(b2.v.numpy(), np.arange(3.0))


def test_root_must_be_mutable_container_without_save_counter():
    with pytest.raises(ValueError, match="root must be an AutoTrackable, dict or list.*got Var"):
        Checkpoint(Variable(jnp.ones(2)))  # would save nothing of it
    with pytest.raises(ValueError, match="got AdamState"):
        Checkpoint(AdamState(jnp.zeros(()), {}, {}))  # cannot be assigned into
    with pytest.raises(ValueError, match="root has a child named 'save_counter'"):
        Checkpoint({"save_counter": np.zeros(())})  # would collide with the counter


def _resign_graph(path, graph):
    """Rewrites the checkpoint's object graph with a valid checksum (a crafted file)."""
    import dataclasses

    from dcheckpoint._metadata import METADATA_FILE, encode_metadata

    meta = dcheckpoint.read_metadata(path)
    data = encode_metadata(dataclasses.replace(meta, object_graph=graph))
    with open(os.path.join(path, METADATA_FILE), "wb") as f:
        f.write(data)


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ({"format": "other"}, "format is not"),
        ({"format": "dcheckpoint.object_graph.v1", "nodes": [], "aliases": {}},
         "'nodes' and 'aliases'"),
        ({"format": "dcheckpoint.object_graph.v1", "nodes": {"v": {"kind": "array"}},
          "aliases": {}}, "no root node"),
        ({"format": "dcheckpoint.object_graph.v1",
          "nodes": {"": {"kind": "trackable", "children": ["v"]}, "v": {"kind": "code"}},
          "aliases": {}}, "node 'v': expected a kind"),
        ({"format": "dcheckpoint.object_graph.v1",
          "nodes": {"": {"kind": "trackable", "children": "v"}}, "aliases": {}},
         "node '': 'children' must be a list"),
        ({"format": "dcheckpoint.object_graph.v1",
          "nodes": {"": {"kind": "trackable", "children": ["v"]}}, "aliases": {"v": "x/y"}},
         "alias 'v' points to 'x/y'"),
    ],
    ids=["format", "nodes-type", "no-root", "kind", "children", "alias"],
)
def test_a_crafted_object_graph_is_a_corrupt_checkpoint(tmp_path, graph, message):
    path = Checkpoint(v=Variable(np.ones(3, np.float32))).write(str(tmp_path / "c"))
    _resign_graph(path, graph)
    target = Variable(np.zeros(3, np.float32))
    with pytest.raises(dcheckpoint.CorruptCheckpointError, match=message):
        Checkpoint(v=target).read(path)
    np.testing.assert_array_equal(np.asarray(target.value), np.zeros(3))  # nothing assigned


def test_reserved_internal_names_are_refused():
    with pytest.raises(ValueError, match="'_dc_model'.*reserved"):
        Checkpoint(_dc_model=Variable(np.ones(2)))
