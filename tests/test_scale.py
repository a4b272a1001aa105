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
