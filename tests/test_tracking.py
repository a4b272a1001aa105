"""The object graph: paths, kinds, shared objects, pytrees, deferred-attach bookkeeping."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcheckpoint._tracking import AutoTrackable, classify, escape, flatten, leaf_paths
from dcheckpoint._variable import Variable


class ScaleState(NamedTuple):  # optax-style state
    count: jax.Array
    mu: dict


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Stats:
    mean: jax.Array
    var: jax.Array


class Dense(AutoTrackable):
    def __init__(self):
        self.kernel = Variable(jnp.zeros((3, 2)))
        self.bias = Variable(jnp.zeros((2,)))
        self.units = 2  # a Python int: saved, with its type
        self.act = jax.nn.relu  # a callable attribute: skipped, as in TF


def test_paths_are_readable_and_kinds_recorded():
    model = AutoTrackable()
    model.dense = Dense()
    arrays, graph = flatten([("model", model)])
    assert sorted(arrays) == ["model/dense/bias", "model/dense/kernel", "model/dense/units"]
    assert arrays["model/dense/units"] == 2
    assert graph["nodes"][""]["children"] == ["model"]
    assert graph["nodes"]["model/dense"] == {
        "kind": "trackable", "children": ["kernel", "bias", "units"]}
    assert graph["nodes"]["model/dense/kernel"] == {"kind": "variable"}
    assert arrays["model/dense/kernel"] is model.dense.kernel.value


def test_pytree_paths_use_field_names():
    adam = ScaleState(jnp.zeros((), jnp.int32), {"w": jnp.ones(2)})
    state = (adam, Stats(jnp.ones(1), jnp.ones(1)))
    arrays, graph = flatten([("opt", state)])
    assert sorted(arrays) == ["opt/0/count", "opt/0/mu/w", "opt/1/mean", "opt/1/var"]
    assert graph["nodes"]["opt/0"]["kind"] == "pytree"
    assert graph["nodes"]["opt/0/mu"]["kind"] == "dict"


def test_shared_object_saved_once_and_alias_recorded():
    v = Variable(jnp.zeros(3))
    a, b = AutoTrackable(), AutoTrackable()
    a.v = v
    b.same = v
    arrays, graph = flatten([("a", a), ("b", b)])
    assert list(arrays) == ["a/v"]
    assert graph["aliases"] == {"b/same": "a/v"}
    assert graph["nodes"]["b"]["children"] == ["same"]


def test_cycle_terminates():
    a = AutoTrackable()
    a.self_ref = a
    a.w = np.zeros(2)
    arrays, graph = flatten([("a", a)])
    assert list(arrays) == ["a/w"]
    assert graph["aliases"] == {"a/self_ref": "a"}


def test_dict_keys_with_slash_are_escaped():
    params = {"layer/0": {"w": jnp.ones(1)}, "100%": np.zeros(1)}
    arrays, _ = flatten([("params", params)])
    assert sorted(arrays) == ["params/100%25", "params/layer%2F0/w"]
    assert escape("a/b") == "a%2Fb"


def test_classify():
    assert classify(Variable(jnp.zeros(1))) == "variable"
    assert classify(np.float32(1)) == "array"
    assert classify({"a": 1}) == "dict"
    assert classify([1]) == "list"
    assert classify(ScaleState(jnp.zeros(()), {})) == "pytree"
    assert classify(3) == "array" and classify(True) == "array" and classify(b"x") == "array"
    assert classify("s") == "value" and classify(None) == "value"
    assert classify(()) == "empty"
    assert classify(object()) is None and classify(jax.nn.relu) is None


def test_leaf_paths_of_subtree():
    d = Dense()
    assert sorted(leaf_paths(d, "model/dense")) == [
        "model/dense/bias", "model/dense/kernel", "model/dense/units"]


def test_pending_restore_runs_on_attach():
    seen = []
    owner = AutoTrackable()
    owner._dc_defer("dense", lambda value: seen.append(value) or "restored")
    owner.other = 1
    assert seen == []
    owner.dense = "new"
    assert seen == ["new"] and owner.dense == "restored"
    owner.dense = "again"  # the pending restore runs once only
    assert owner.dense == "again"
