"""Run by tests/test_dtensor_checkpoint.py under ``python -m launch``.

``save DIR X,Y``: builds sharded Variables on an (X, Y) mesh and saves them with a
DTensorCheckpoint. ``restore DIR X,Y``: builds zero Variables laid out differently on an
(X, Y) mesh and restores. Both print the sha256 of each gathered global value.
"""

import hashlib
import json
import sys
from typing import NamedTuple

import launch

info = launch.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from dcheckpoint._dtensor import DTensorCheckpoint  # noqa: E402
from dcheckpoint._tracking import AutoTrackable  # noqa: E402
from dcheckpoint._variable import Variable  # noqa: E402
from mesh import Layout, Mesh  # noqa: E402


class Adam(NamedTuple):
    count: np.ndarray
    mu: dict


def build(mesh, restore):
    """The model; on restore every value starts at zero and dims are split the other way."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((8, 16), dtype=np.float32)
    bias = np.arange(16, dtype=np.int32)
    mu = rng.standard_normal((16, 8), dtype=np.float32)
    if restore:
        kernel, bias, mu = np.zeros_like(kernel), np.zeros_like(bias), np.zeros_like(mu)
    a, b = mesh.axis_names
    kernel_specs = [b, a] if restore else [a, b]
    model = AutoTrackable()
    model.kernel = Variable(kernel, layout=Layout(kernel_specs, mesh))
    model.bias = Variable(bias, layout=Layout([a], mesh))
    opt = Adam(np.int64(0 if restore else 5), {"kernel": Variable(mu, Layout([b, None], mesh))})
    return model, opt


def checksums(model, opt, ckpt):
    values = {
        "kernel": model.kernel.value,
        "bias": model.bias.value,
        "mu": opt.mu["kernel"].value,
    }
    out = {}
    for name, value in values.items():
        host = np.asarray(multihost_utils.process_allgather(value, tiled=True))
        out[name] = hashlib.sha256(host.tobytes()).hexdigest()
    out["count"] = int(opt.count)
    out["save_counter"] = int(np.asarray(ckpt.save_counter.value))
    out["kernel_spec"] = [None if s is None else str(s) for s in model.kernel.sharding.spec]
    return out


def main():
    mode, directory, shape = sys.argv[1], sys.argv[2], tuple(map(int, sys.argv[3].split(",")))
    mesh = Mesh.from_jax(jax.make_mesh(shape, ("x", "y"), devices=jax.devices()))
    model, opt = build(mesh, restore=mode == "restore")
    ckpt = DTensorCheckpoint(mesh, model=model, opt=opt)
    if mode == "save":
        path = ckpt.save(directory)
    else:
        path = directory
        ckpt.restore(path).assert_consumed()
        opt = ckpt.opt  # the NamedTuple was rebuilt and re-assigned
    result = {"rank": info.process_index, "path": path, **checksums(model, opt, ckpt)}
    print("RESULT " + json.dumps(result), flush=True)


main()
