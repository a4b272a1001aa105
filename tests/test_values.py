"""Every value handed to a checkpoint comes back with its type, or the call fails.

Python scalars, strings, None and bytes; typed PRNG keys (sharded too); the ml_dtypes
types TensorStore stores; the errors that name what cannot be saved; and
``Checkpoint.save`` recording the latest checkpoint so TF's resume loop works.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dcheckpoint import (
    AutoTrackable,
    Checkpoint,
    CheckpointMismatchError,
    CorruptCheckpointError,
    DTensorCheckpoint,
    Variable,
    get_checkpoint_state,
    latest_checkpoint,
    restore_pytree,
    save_pytree,
)
from dcheckpoint._metadata import METADATA_FILE, decode_metadata
from tests.mp_util import REPO_ROOT

SCALARS = {"i": 6, "f": 0.25, "b": True, "c": 1 + 2j, "big": 2**40, "raw": b"\x00ab",
           "np32": np.float32(1.5), "npi": np.int16(-3)}


def test_python_values_round_trip_with_their_types(tmp_path):
    config = {"name": "run-7", "layers": [64, 32], "dropout": None, "lr": 3e-4, "warm": False}
    path = Checkpoint(scalars=dict(SCALARS), config=config, tag="baseline").save(
        str(tmp_path / "ckpt"))

    scalars = {k: type(v)(0) if not isinstance(v, bytes) else b"" for k, v in SCALARS.items()}
    fresh_config = {"name": "", "layers": [0, 0], "dropout": None, "lr": 0.0, "warm": True}
    ckpt = Checkpoint(scalars=scalars, config=fresh_config, tag="")
    ckpt.restore(path).assert_consumed()
    for key, want in SCALARS.items():
        assert type(scalars[key]) is type(want) and scalars[key] == want, key
    assert fresh_config == config and type(fresh_config["layers"][0]) is int
    assert ckpt.tag == "baseline"


def test_checkpoint_values_nobody_restores_are_reported(tmp_path):
    path = Checkpoint(tag="x", n=3).write(str(tmp_path / "c"))
    status = Checkpoint().read(path).expect_partial()
    with pytest.raises(AssertionError, match=r"'n'.*'tag'|'tag'.*'n'"):
        status.assert_consumed()


def test_train_state_int_step_is_saved_not_dropped(tmp_path):
    # The original report: a pytree whose step is a Python int lost it silently.
    from flax import struct

    @struct.dataclass
    class State:
        step: int
        params: dict

    state = State(step=6, params={"w": jnp.ones((8, 2))})
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    path = DTensorCheckpoint(mesh, ts=state).save(str(tmp_path / "ckpt"))
    ckpt = DTensorCheckpoint(mesh, ts=State(step=0, params={"w": jnp.zeros((8, 2))}))
    ckpt.restore(path).assert_consumed()
    assert type(ckpt.ts.step) is int and ckpt.ts.step == 6
    # A fresh state whose step is an int32 array takes the saved int, cast exactly.
    arr = DTensorCheckpoint(mesh, ts=State(step=jnp.zeros((), jnp.int32),
                                           params={"w": jnp.zeros((8, 2))}))
    arr.restore(path).assert_consumed()
    assert arr.ts.step.dtype == jnp.int32 and int(arr.ts.step) == 6


def test_scalar_into_too_small_array_is_refused(tmp_path):
    path = Checkpoint(s={"n": 2**40}).write(str(tmp_path / "c"))
    with pytest.raises(CheckpointMismatchError, match=r"'s/n'.*int32.*cannot hold 1099511627776"):
        Checkpoint(s={"n": jnp.zeros((), jnp.int32)}).read(path)


def test_save_pytree_scalars_keep_their_type(tmp_path):
    tree = {"step": 3, "lr": 0.5, "done": False, "w": np.arange(4.0)}
    save_pytree(str(tmp_path / "t"), tree)
    restored = restore_pytree(str(tmp_path / "t"), {"step": 0, "lr": 0.0, "done": True,
                                                      "w": np.zeros(4)})
    assert restored["step"] == 3 and type(restored["step"]) is int
    assert restored["lr"] == 0.5 and type(restored["lr"]) is float
    assert restored["done"] is False
    # An array target asks for an array: it gets one.
    as_array = restore_pytree(str(tmp_path / "t"), {"step": None, "lr": None, "done": None,
                                                    "w": None})
    assert as_array["step"] == 3 and type(as_array["step"]) is int  # host target: Python
    scalar = restore_pytree(str(tmp_path / "t"), {"step": np.int64(0), "lr": None,
                                                  "done": None, "w": None})
    assert scalar["step"] == 3  # a numpy scalar target is accepted (host: the saved int)


def test_checkpoint_written_scalar_readable_by_restore_pytree(tmp_path):
    path = Checkpoint(opt={"count": 7}).write(str(tmp_path / "c"))
    restored = restore_pytree(path, {"opt": {"count": 0}})
    assert restored["opt"]["count"] == 7 and type(restored["opt"]["count"]) is int


def test_unsaveable_value_in_a_container_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"'cfg/act': a value of type function cannot be"):
        Checkpoint(cfg={"act": lambda x: x}).write(str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"'opt/1': a value of type object cannot be saved"):
        Checkpoint(opt=(jnp.ones(2), object())).write(str(tmp_path / "d"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match=r"'s/big'.*does not fit in 64 bits"):
        Checkpoint(s={"big": 2**70}).write(str(tmp_path / "e"))


def test_trackable_callable_attributes_are_skipped_and_data_saved(tmp_path):
    class Model(AutoTrackable):
        def __init__(self):
            self.w = Variable(jnp.ones(3))
            self.act = jax.nn.relu  # code, not state: skipped as in TF
            self.units = 3
            self.name = "m"

    path = Checkpoint(model=Model()).write(str(tmp_path / "c"))
    meta = json.loads((tmp_path / "c" / METADATA_FILE).read_text())["checkpoint"]
    assert meta["object_graph"]["nodes"]["model"]["children"] == ["w", "units", "name"]
    assert meta["object_graph"]["nodes"]["model/name"] == {"kind": "value", "value": "m"}
    assert meta["arrays"]["model/units"]["python_type"] == "int"
    fresh = Model()
    fresh.units, fresh.name = 0, ""
    Checkpoint(model=fresh).read(path).assert_consumed()
    assert (fresh.units, fresh.name) == (3, "m")


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_typed_prng_keys_round_trip_sharded(tmp_path, impl):
    source = jax.make_mesh((4, 2), ("x", "y"))
    keys = jax.random.split(jax.random.key(0, impl=impl), 8)
    keys = jax.device_put(keys, NamedSharding(source, P("x")))
    single = jax.random.key(42, impl=impl)
    path = DTensorCheckpoint(source, rng={"keys": keys, "one": single}).save(
        str(tmp_path / "ckpt"))

    for target in (jax.make_mesh((2, 4), ("x", "y")), None):
        sharding = (NamedSharding(target, P("y")) if target is not None
                    else jax.sharding.SingleDeviceSharding(jax.devices()[3]))
        fresh = {"keys": jax.device_put(jax.random.split(jax.random.key(9, impl=impl), 8),
                                        sharding),
                 "one": jax.random.key(1, impl=impl)}
        Checkpoint(rng=fresh).restore(path).assert_consumed()
        assert jax.random.key_impl(fresh["keys"]) == jax.random.key_impl(keys)
        assert fresh["keys"].sharding == sharding
        np.testing.assert_array_equal(jax.random.key_data(fresh["keys"]),
                                      jax.random.key_data(keys))
        np.testing.assert_array_equal(jax.random.key_data(fresh["one"]),
                                      jax.random.key_data(single))
        # The restored keys draw what the saved ones draw.
        np.testing.assert_array_equal(jax.random.uniform(fresh["one"], (3,)),
                                      jax.random.uniform(single, (3,)))

    tree = restore_pytree(path, {"rng": {"keys": keys, "one": single}})
    np.testing.assert_array_equal(jax.random.key_data(tree["rng"]["keys"]),
                                  jax.random.key_data(keys))


def test_key_impl_mismatch_is_named(tmp_path):
    path = Checkpoint(k=jax.random.key(0)).write(str(tmp_path / "c"))
    with pytest.raises(CheckpointMismatchError, match=r"'k'.*threefry2x32 PRNG key data"):
        Checkpoint(k=jax.random.key(0, impl="rbg")).read(path)
    with pytest.raises(CheckpointMismatchError, match=r"'k'.*threefry2x32 PRNG key data"):
        Checkpoint(k=np.zeros(2, np.uint32)).read(path)


ML_DTYPES = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
             "float8_e4m3b11fnuz", "float8_e3m4", "float4_e2m1fn", "int4", "int2"]


@pytest.mark.parametrize("name", ML_DTYPES)
def test_ml_dtypes_round_trip(tmp_path, name):
    dtype = getattr(ml_dtypes, name)
    values = np.array([1, -1, 0, 1, -2, 1, 0, -1], dtype=np.float32)
    host = values.astype(dtype)
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    device = jax.device_put(jnp.asarray(host), NamedSharding(mesh, P("x")))
    path = save_pytree(str(tmp_path / "t"), {"d": device, "h": host})
    out = restore_pytree(path, {"d": jax.ShapeDtypeStruct(host.shape, dtype,
                                                          sharding=NamedSharding(mesh, P())),
                                "h": np.zeros_like(host)})
    for got in (out["d"], out["h"]):
        assert np.dtype(got.dtype) == np.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32), values)


def test_unsupported_dtype_names_the_leaf_and_what_is_supported(tmp_path):
    with pytest.raises(ValueError, match=r"'opt/q': dtype uint4 cannot be saved; supported "
                                         r"dtypes are .*float8_e4m3fn.*\.astype"):
        Checkpoint(opt={"q": np.zeros(4, ml_dtypes.uint4)}).write(str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_crafted_python_type_and_key_impl_are_refused(tmp_path):
    path = Checkpoint(n=3, k=jax.random.key(0)).write(str(tmp_path / "c"))
    doc = json.loads((tmp_path / "c" / METADATA_FILE).read_text())
    for field, bad in (("python_type", "object"), ("key_impl", "../evil")):
        entry = "n" if field == "python_type" else "k"
        body = json.loads(json.dumps(doc["checkpoint"]))
        body["arrays"][entry][field] = bad
        crafted = dict(doc, checkpoint=body)
        from dcheckpoint._metadata import _digest
        crafted["sha256"] = _digest(body)
        with pytest.raises(CorruptCheckpointError, match=f"{field} must be one of"):
            decode_metadata(json.dumps(crafted).encode(), source=path)


def test_save_records_latest_and_write_does_not(tmp_path):
    ckpt = Checkpoint(w=Variable(jnp.arange(4.0)))
    ckpt.write(str(tmp_path / "manual"))
    assert latest_checkpoint(tmp_path) is None  # write() leaves the state file alone
    first = ckpt.save(str(tmp_path / "ckpt"))
    assert latest_checkpoint(tmp_path) == first
    second = ckpt.save(str(tmp_path / "ckpt"))
    state = get_checkpoint_state(tmp_path)
    assert latest_checkpoint(tmp_path) == second == str(tmp_path / "ckpt-2")
    assert state.all_model_checkpoint_paths == (second,)  # as TF: no list, no retention
    assert (tmp_path / "ckpt-1").exists()  # nothing deleted
    from dcheckpoint import CheckpointOptions

    third = ckpt.save(str(tmp_path / "ckpt"), options=CheckpointOptions(enable_async=True))
    ckpt.sync()  # recorded once the background commit is done
    assert latest_checkpoint(tmp_path) == third == str(tmp_path / "ckpt-3")


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax.numpy as jnp, numpy as np
    from dcheckpoint import Checkpoint, Variable, latest_checkpoint
    d = sys.argv[1]
    w = Variable(jnp.zeros(4))
    state = {"step": 0}
    ckpt = Checkpoint(w=w, state=state)
    ckpt.restore(latest_checkpoint(d))   # None on the first run: a no-op, as in TF
    for _ in range(2):
        state["step"] += 1
        w.assign(w.value + 1.0)
        path = ckpt.save(d + "/ckpt")
    print(json.dumps({"path": path, "step": state["step"], "w": np.asarray(w.value).tolist()}))
""")


def test_tf_resume_loop_across_two_processes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    env = {"PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "run")],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"path": str(tmp_path / "run" / "ckpt-2"), "step": 2, "w": [2.0] * 4}
    # The second process resumed: numbering, Python state and arrays all continue.
    assert runs[1] == {"path": str(tmp_path / "run" / "ckpt-4"), "step": 4, "w": [4.0] * 4}


def test_none_attribute_takes_the_saved_value_and_scalars_refuse_arrays(tmp_path):
    path = Checkpoint(s={"w": np.arange(3.0), "n": None, "k": 4}).write(str(tmp_path / "c"))
    target = {"w": None, "n": 5, "k": None}  # None, or a scalar where None was saved
    Checkpoint(s=target).read(path).assert_consumed()
    np.testing.assert_array_equal(target["w"], np.arange(3.0))
    assert target["n"] is None and target["k"] == 4 and type(target["k"]) is int
    with pytest.raises(CheckpointMismatchError, match=r"'s/w': the object has the Python "
                                                      r"value 0 \(a scalar\).*shape \(3,\)"):
        Checkpoint(s={"w": 0, "n": None, "k": 0}).read(path)


def test_crafted_process_state_is_refused(tmp_path):
    from dcheckpoint._tracking import decode_state

    with pytest.raises(CorruptCheckpointError, match="malformed per-process state"):
        decode_state("it", {"bytes": "not base64!"})
    with pytest.raises(CorruptCheckpointError, match="malformed per-process state"):
        decode_state("it", {"pickle": "x"})
    assert decode_state("it", {"bytes": "YWI="}) == b"ab"


def test_variable_holding_keys_restores_in_place(tmp_path):
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    keys = jax.device_put(jax.random.split(jax.random.key(5), 4), NamedSharding(mesh, P("x")))
    path = Checkpoint(v=Variable(keys)).write(str(tmp_path / "c"))
    target = Variable(jax.device_put(jax.random.split(jax.random.key(0), 4),
                                     NamedSharding(jax.make_mesh((2, 4), ("x", "y")), P("y"))))
    sharding = target.sharding
    Checkpoint(v=target).read(path).assert_consumed()
    assert target.sharding == sharding
    np.testing.assert_array_equal(jax.random.key_data(target.value), jax.random.key_data(keys))


def test_save_pytree_refuses_a_string_leaf_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"'cfg/name' has type builtins.str"):
        save_pytree(str(tmp_path / "t"), {"cfg": {"name": "run"}, "w": np.ones(2)})
    assert not (tmp_path / "t").exists()
