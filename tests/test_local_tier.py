"""The local tier across 4 real processes: peer copies, renumbered ranks, a replaced
host, a killed local save, a flipped byte, fewer processes, and the fallback to the
persistent tier. One job's directories go through the phases in order."""

import json
import os
import shutil

import grain
import jax.numpy as jnp
import numpy as np
import pytest

import dcheckpoint
from dcheckpoint._cli import main
from dcheckpoint._local_format import piece_key
from dcheckpoint._local_tier import _assign, _choose_step
from tests.mp_util import REPO_ROOT, results, run_launch

WORKER = REPO_ROOT / "tests" / "workers" / "local_tier_worker.py"


def _restore(persistent, hosts, order, mesh, processes=4):
    completed = run_launch(WORKER, "restore", persistent, hosts, order, mesh,
                           processes=processes, devices_per_process=8 // processes)
    return results(completed), completed.stderr


def test_local_tier_phases(tmp_path):
    persistent, hosts = str(tmp_path / "persistent"), str(tmp_path / "hosts")
    # Local every 2 steps, persistent every 5; every process is SIGKILLed inside the
    # local save of step 8, after both copies are written and before the commit.
    killed = run_launch(WORKER, "train", persistent, hosts, "0,1,2,3", 8, 8,
                        processes=4, devices_per_process=2, check=False)
    assert killed.returncode != 0
    for host in range(4):
        step_dirs = sorted(os.listdir(os.path.join(hosts, f"host{host}")))
        assert step_dirs == ["step-4", "step-6", "step-8"]  # retention: 2 committed
        assert not os.path.exists(os.path.join(hosts, f"host{host}", "step-8", "COMMITTED"))
        assert os.path.exists(os.path.join(hosts, f"host{host}", "step-6", "COMMITTED"))
    assert [n for n in os.listdir(persistent) if n.startswith("ckpt")] == ["ckpt-5"]

    # A replaced host (its directory is empty) and renumbered ranks: step 6, newer than
    # the persistent step 5, comes back from the peer copy, bit-identical; the killed
    # step 8 is never chosen.
    shutil.rmtree(os.path.join(hosts, "host1"))
    out, _ = _restore(persistent, hosts, "2,0,3,1", "2x4")
    assert [(r["step"], r["from"], r["identical"]) for r in out] == [
        (6, "local step 6", True)] * 4

    # Onto 2 processes (another process count and mesh), from two surviving hosts
    # that together hold every piece.
    out, _ = _restore(persistent, hosts, "0,2", "4x2", processes=2)
    assert [(r["step"], r["from"], r["identical"], r["shards"]) for r in out] == [
        (6, "local step 6", True, 4)] * 2

    # A flipped byte in host 0's own copy of step 6, whose peer copy was on the wiped
    # host 1: the checksum catches it and step 6 is skipped, never restored; local step
    # 4 is older than the persistent step 5, which is restored.
    index = json.load(open(os.path.join(hosts, "host0", "step-6", "own.json")))
    piece = os.path.join(hosts, "host0", "step-6", index["pieces"][0]["file"])
    data = bytearray(open(piece, "rb").read())
    data[0] ^= 0x01
    open(piece, "wb").write(bytes(data))
    out, stderr = _restore(persistent, hosts, "0,1,2,3", "2x4")
    assert [(r["step"], r["from"], r["identical"]) for r in out] == [
        (5, os.path.join(persistent, "ckpt-5"), True)] * 4
    assert "fails its checksum" in stderr and "local step 6 cannot be restored" in stderr

    # Both copies of process 1's pieces gone (hosts 1 and 2): the persistent step 5,
    # with a log line saying why.
    shutil.rmtree(os.path.join(hosts, "host2"))
    out, stderr = _restore(persistent, hosts, "0,1,2,3", "2x4")
    assert [(r["step"], r["from"], r["identical"]) for r in out] == [
        (5, os.path.join(persistent, "ckpt-5"), True)] * 4
    assert "no live copy of parts of ['w']" in stderr
    assert "using the persistent tier (latest step 5)" in stderr


def test_failure_domains_send_every_copy_out_of_the_big_domain(tmp_path, monkeypatch):
    # Hosts 0-2 in rack r1, host 3 in r2: hosts 0-2 send their copies to host 3, host 3
    # to host 2. Losing host 3 (every copy of r1's pieces) still restores step 6.
    monkeypatch.setenv("LOCAL_DOMAINS", "r1,r1,r1,r2")
    persistent, hosts = str(tmp_path / "persistent"), str(tmp_path / "hosts")
    out = results(run_launch(WORKER, "train", persistent, hosts, "0,1,2,3", 6,
                             processes=4, devices_per_process=2))
    assert [r["local"] for r in out] == [[4, 6]] * 4
    peer = json.load(open(os.path.join(hosts, "host3", "step-6", "peer.json")))
    assert peer["source_processes"] == [0, 1, 2]
    shutil.rmtree(os.path.join(hosts, "host3"))
    restored, _ = _restore(persistent, hosts, "3,2,1,0", "4x2")
    assert [(r["step"], r["from"], r["identical"]) for r in restored] == [
        (6, "local step 6", True)] * 4


def _inventory(step, save, pieces, kind="own"):
    return {"step": step, "save": save, "time": float(step),
            "arrays": {"w": 8}, "pieces": {key: [kind, 16] for key in pieces}}


W = [piece_key("w", (slice(0, 4),)), piece_key("w", (slice(4, 8),))]


def test_choose_step_takes_the_newest_covered_step():
    # Step 6 lost w[4:8] (both holders gone); step 4 is covered by process 1's copies.
    chosen = _choose_step([[_inventory(6, "b", W[:1]), _inventory(4, "a", W[:1])],
                           [_inventory(4, "a", W[1:], "peer")], []])
    assert (chosen["step"], chosen["save"]) == (4, "a")
    assert chosen["lacking"] == [2] and chosen["metadata_from"] == 0
    none = _choose_step([[_inventory(6, "b", W[:1])], []])
    assert none["step"] is None and "step 6 has no live copy of parts of ['w']" in none["why"]


def test_assign_prefers_local_copies_then_skips_bad_ones():
    holders = {W[0]: [[0, "own", 16], [1, "peer", 16]], W[1]: [[1, "own", 16]]}
    plans = _assign([{"needs": W, "bad": []}, {"needs": W, "bad": []}], holders)["plans"]
    assert plans[0] == {"local": [[W[0], "own"]], "send": {}, "recv": {"1": [W[1]]}}
    assert plans[1]["local"] == [[W[0], "peer"], [W[1], "own"]]
    # Process 0's copy of w[0:4] is bad: process 1's peer copy serves it.
    plans = _assign([{"needs": W, "bad": [[W[0], "own"]]}, {"needs": [], "bad": []}],
                    holders)["plans"]
    assert plans[0]["recv"] == {"1": [W[0], W[1]]}
    unusable = _assign([{"needs": W, "bad": []}, {"needs": [], "bad": [[W[1], "own"]]}],
                       holders)
    assert "no copy with a good checksum left" in unusable["unusable"]


def test_piece_keys_name_global_bounds():
    assert piece_key("a/b", (slice(0, 2), slice(4, 8))) == '["a/b", [[0, 2], [4, 8]]]'


def test_one_process_object_api_resumes_from_the_local_tier_and_ls_shows_it(
        tmp_path, capsys):

    def job():
        step = dcheckpoint.Variable(jnp.int32(0))
        w = dcheckpoint.Variable(jnp.zeros((8, 4)))
        # A data iterator: per-process state, recorded in the local step's metadata.
        job.data = iter(grain.MapDataset.range(64).batch(2).to_iter_dataset())
        manager = dcheckpoint.CheckpointManager(
            dcheckpoint.Checkpoint(step=step, w=w, data=job.data), tmp_path / "persistent",
            max_to_keep=2,
            step_counter=step, checkpoint_interval=4, local_directory=tmp_path / "local",
            local_every=2)
        return manager, step, w

    manager, step, w = job()
    for s in range(1, 8):  # persistent at steps 1 and 5, local at 2, 4, 6 (keeps 4, 6)
        step.assign(jnp.int32(s))
        w.assign(jnp.full((8, 4), float(s)))
        if s <= 6:
            next(job.data)
        manager.save()
    manager.sync()
    assert manager.local_steps == [4, 6]
    manager, step, w = job()
    assert manager.restore_or_initialize() == str(tmp_path / "local" / "step-6")
    assert manager.restored_from == "local step 6" and int(step.value) == 6
    np.testing.assert_array_equal(np.asarray(w.value), np.full((8, 4), 6.0))
    assert int(manager.checkpoint.save_counter.value) == 2  # as after the call at step 6
    assert next(job.data).tolist() == [12, 13]  # six batches were read by step 6

    # Another run (another persistent directory) never takes this run's local steps.
    other = dcheckpoint.CheckpointManager(
        dcheckpoint.Checkpoint(step=dcheckpoint.Variable(jnp.int32(0))), tmp_path / "other",
        max_to_keep=1, step_counter=dcheckpoint.Variable(jnp.int32(0)),
        local_directory=tmp_path / "local")
    assert other.local_steps == [] and other.restore_or_initialize() is None

    assert main(["ls", "--local", str(tmp_path / "local"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["local"][0]["steps"]
    assert [(r["step"], r["committed"], r["own"]["pieces"]) for r in listed] == [
        (4, True, 3), (6, True, 3)]


def test_local_every_needs_a_local_directory_and_a_step_counter(tmp_path):
    import dcheckpoint

    with pytest.raises(ValueError, match="local_every needs a local_directory"):
        dcheckpoint.PytreeManager(tmp_path / "a", local_every=2)
    with pytest.raises(ValueError, match="needs a step_counter"):
        dcheckpoint.CheckpointManager(dcheckpoint.Checkpoint(), tmp_path / "b", 1,
                                      local_directory=tmp_path / "local")


@pytest.mark.parametrize(("domains", "expected"), [
    (["h"] * 4, [1, 2, 3, 0]),                     # one domain: the next process
    (["a", "a", "b", "b"], [2, 3, 0, 1]),           # 2 hosts x 2: the other host's twin
    (["a", "b", "a", "b"], [1, 0, 3, 2]),           # interleaved ranks: still across
    (["r1", "r1", "r1", "r2"], [3, 3, 3, 2]),       # one big domain: every copy leaves it
    (["x"], [0]),
])
def test_peer_map_sends_each_copy_out_of_its_failure_domain(domains, expected):
    from dcheckpoint._local_tier import peer_map

    peers = peer_map(domains)
    assert peers == expected
    if len(set(domains)) > 1:
        assert all(domains[p] != domains[q] for p, q in enumerate(peers))
