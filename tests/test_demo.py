"""The README's demo, shortened: SIGKILL a 2 x 4-device job, resume on 1 x 8, compare;
then SIGTERM one rank of the same job with save_on_preemption, resume, compare; then a
local tier: SIGKILL, wipe one host's local directory, resume renumbered from it."""

import json
import subprocess
import sys

from tests.mp_util import REPO_ROOT


def test_preempted_job_resumes_on_another_mesh_bit_identical(tmp_path):
    facts_file = tmp_path / "facts.json"
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "demo.py"),
        "--steps", "16", "--save-every", "4", "--preempt-after", "5", "--step-sleep", "0.2",
        "--workdir", str(tmp_path / "work"), "--json-out", str(facts_file),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    facts = json.loads(facts_file.read_text())

    preempted, resumed = facts["preempted"], facts["resumed"]
    # The ranks really died mid-run, after committing a checkpoint past step 5.
    assert len(preempted["killed_pids"]) == 2
    assert preempted["exit_code"] != 0
    assert preempted["last_step"] < 16
    assert max(preempted["committed"]) >= 5
    # The resume started from that checkpoint, not from scratch.
    start = resumed["start_step"]
    assert start in preempted["committed"] and start >= 5
    assert resumed["restored_from"].endswith(f"ckpt-{start}")
    assert facts["uninterrupted"]["start_step"] == 0
    assert facts["uninterrupted"]["restored_from"] is None
    # Same final state, to the last bit, as the job that was never interrupted.
    assert resumed["step"] == facts["uninterrupted"]["step"] == 16
    assert facts["identical"] == {"w1": True, "b1": True, "w2": True, "b2": True}
    assert facts["max_abs_diff"] == 0.0
    assert resumed["loss_hex"] == facts["uninterrupted"]["loss_hex"]
    # SIGTERM to rank 1 only, JAX's preemption service on (launch starts
    # jax.distributed): the ranks' own exchange still decides, so both saved within two
    # step boundaries of the notice (rank 1 is at most one step past the step line that
    # triggered it; its flag is answered one step later), then exited 0.
    sigtermed, resumed_term = facts["sigtermed"], facts["resumed_sigterm"]
    assert sigtermed["exit_code"] == 0
    notice = sigtermed["sigterm_after_step"]
    assert notice >= 5
    assert notice < sigtermed["preemption_step"] <= notice + 2
    assert sigtermed["committed"][-1] == sigtermed["preemption_step"]
    assert sigtermed["preemption_step"] < 16  # it stopped early, not at the end
    assert resumed_term["start_step"] == sigtermed["preemption_step"]
    assert resumed_term["restored_from"].endswith(f"ckpt-{sigtermed['preemption_step']}")
    assert facts["sigterm_params_identical"] and facts["sigterm_loss_identical"]
    assert facts["sigterm_max_abs_diff"] == 0.0
    assert resumed_term["loss_hex"] == facts["uninterrupted"]["loss_hex"]
    # The local tier: killed once a local step was newer than every persistent
    # checkpoint; host1's directory wiped; the renumbered resume (rank 0 on the wiped
    # host) came back from the local tier at that newer step, through host0's peer copy.
    local, local_resumed = facts["local_tier"], facts["local_tier"]["resumed"]
    newest_local = local["at_kill"]["local"]
    assert newest_local > max(local["at_kill"]["persistent"])
    assert local_resumed["restored_tier"].startswith("local step ")
    start = local_resumed["start_step"]
    assert local_resumed["restored_tier"] == f"local step {start}"
    assert start >= newest_local and start % 2 == 0
    assert local_resumed["step"] == 16
    assert facts["local_params_identical"] and facts["local_loss_identical"]
    assert facts["local_max_abs_diff"] == 0.0
    assert "result    : MATCH" in completed.stdout
