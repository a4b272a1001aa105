"""DTensorCheckpoint: save on one mesh, restore onto another (in-process and under mpiexec)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from dcheckpoint._dtensor import DTensorCheckpoint
from dcheckpoint._variable import Variable
from mesh import Layout, Mesh
from tests.mp_util import results, run_launch

WORKER = Path(__file__).parent / "workers" / "dtensor_worker.py"


def _mesh(shape):
    return Mesh.from_jax(jax.make_mesh(shape, ("x", "y")))


@pytest.mark.parametrize("target_shape", [(2, 4), (8, 1)])
def test_reshard_in_process(tmp_path, target_shape):
    values = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    source = _mesh((4, 2))
    w = Variable(values, layout=Layout(["x", "y"], source))
    path = DTensorCheckpoint(source, w=w).save(str(tmp_path / "ckpt"))

    target = _mesh(target_shape)
    layout = Layout(["y", None], target)
    restored = Variable(np.zeros_like(values), layout=layout)
    DTensorCheckpoint(target, w=restored).restore(path).assert_consumed()
    assert restored.sharding.is_equivalent_to(layout.to_sharding(), 2)
    np.testing.assert_array_equal(restored.numpy(), values)


def test_numpy_leaf_lands_on_mesh_replicated(tmp_path):
    m = _mesh((4, 2))
    path = DTensorCheckpoint(m, state={"step": np.arange(3)}).write(str(tmp_path / "c"))
    state = {"step": np.zeros(3, np.int64)}
    DTensorCheckpoint(m, state=state).read(path).assert_consumed()
    assert isinstance(state["step"], jax.Array)
    assert state["step"].sharding.is_fully_replicated
    assert state["step"].sharding.mesh == m.jax_mesh
    np.testing.assert_array_equal(np.asarray(state["step"]), np.arange(3))


def test_rejects_non_mesh():
    with pytest.raises(ValueError, match="needs a mesh.Mesh or jax.sharding.Mesh, got str"):
        DTensorCheckpoint("mesh")


def test_save_2x4_restore_1x8_then_4x2(tmp_path):
    # Saved by 2 processes x 4 devices on a (4, 2) mesh, restored by 1 process x 8
    # devices on (2, 4) and by 4 processes x 2 devices on (8, 1), with the kernel split
    # along the other dimension: every gathered value must be bit-identical.
    prefix = str(tmp_path / "ckpt")
    saved = results(run_launch(WORKER, "save", prefix, "4,2", processes=2, devices_per_process=4))
    assert [r["path"] for r in saved] == [prefix + "-1"] * 2
    assert saved[0]["save_counter"] == 1 and saved[0]["count"] == 5
    for processes, devices, shape in [(1, 8, "2,4"), (4, 2, "8,1")]:
        restored = results(
            run_launch(
                WORKER, "restore", prefix + "-1", shape,
                processes=processes, devices_per_process=devices,
            )
        )  # fmt: skip
        assert len(restored) == processes
        for r in restored:
            for key in ("kernel", "bias", "mu", "count", "save_counter"):
                assert r[key] == saved[0][key], (shape, key)
            assert r["kernel_spec"] == ["y", "x"]
