"""scripts/scale.py --simulate: the command line and JSON others script against
(issue 22), on a small simulated job."""

import json
import subprocess
import sys

from tests.mp_util import REPO_ROOT

KEYS = {"processes", "arrays", "devices_per_process", "save", "gathered_bytes",
        "broadcast_bytes", "coordinator_cpu_s", "metadata_bytes", "restore_plan_s"}


def test_simulate_writes_one_row_per_process_count_and_save_kind(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "scale.py"), "--simulate", "4", "16",
         "--arrays", "30", "--devices-per-process", "2", "--json", str(out),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["processes"], r["save"]) for r in rows] == [
        (4, "first"), (4, "steady"), (16, "first"), (16, "steady")]
    for r in rows:
        assert KEYS <= set(r)
        assert (r["arrays"], r["devices_per_process"]) == (30, 2)
        assert r["gathered_bytes"] > 0 and r["broadcast_bytes"] > 0
        assert r["coordinator_cpu_s"] >= 0 and r["restore_plan_s"] > 0
    first, steady = rows[2], rows[3]
    # A steady save sends a fingerprint per process, not its chunks.
    assert steady["gathered_bytes"] < first["gathered_bytes"]
    assert steady["gathered_bytes"] / 15 < 600
    # The metadata file does not grow with the processes (but for digits of the mesh size).
    assert abs(rows[0]["metadata_bytes"] - rows[2]["metadata_bytes"]) < 100
    assert "gathered" in done.stdout  # the printed table


def test_a_restoring_process_checks_only_the_chunk_files_it_reads(tmp_path):
    # Issue 22: a host that restores its own slices must not list every host's chunk
    # files (O(P) directory entries per array); it checks the ones it reads.
    import os

    import jax
    import numpy as np
    import pytest
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import dcheckpoint
    from dcheckpoint import _bounds, _engine
    from dcheckpoint._storage import open_storage
    from dcheckpoint.errors import CorruptCheckpointError

    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4),
                       NamedSharding(mesh, P("d", None)))
    path = str(tmp_path / "ckpt")
    dcheckpoint.save_pytree(path, {"w": w})
    meta = _engine.read_metadata(path).arrays["w"]
    storage = open_storage(path)
    mine = [(slice(4, 8), slice(0, 4))]  # a host holding rows 4..7: chunks (2, 0), (3, 0)
    _bounds.check_chunk_files(storage, "w", meta, path, reads=mine)
    chunks = os.path.join(path, meta.storage_path, "c")
    os.remove(os.path.join(chunks, "6", "0"))  # another host's chunk: not this one's concern
    _bounds.check_chunk_files(storage, "w", meta, path, reads=mine)
    with pytest.raises(CorruptCheckpointError, match="only 7 chunk files exist"):
        _bounds.check_chunk_files(storage, "w", meta, path)  # the whole array
    os.remove(os.path.join(chunks, "3", "0"))
    with pytest.raises(CorruptCheckpointError, match=r"chunk file c/3/0 of its grid of 8 "
                                                     r"chunks is missing"):
        _bounds.check_chunk_files(storage, "w", meta, path, reads=mine)
    os.symlink("/etc/hostname", os.path.join(chunks, "3", "0"))
    with pytest.raises(CorruptCheckpointError, match="expected a regular file, found a "
                                                     "symbolic link"):
        _bounds.check_chunk_files(storage, "w", meta, path, reads=mine)


def test_a_wrong_simulated_save_exits_non_zero(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale", REPO_ROOT / "scripts" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    real = scale.SimulatedState.chunks

    def losing_one(self, p):  # process 1 "forgets" one chunk it wrote
        chunks = real(self, p)
        if p == 1:
            path = next(iter(chunks))
            chunks[path] = chunks[path][1:]
        return chunks

    monkeypatch.setattr(scale.SimulatedState, "chunks", losing_one)
    code = scale.main(["--simulate", "4", "--arrays", "20", "--devices-per-process", "2",
                       "--workdir", str(tmp_path)])
    assert code == 1
    assert "wrong result" in capsys.readouterr().err
