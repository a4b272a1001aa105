"""Save on preemption: a SIGTERM becomes one agreed step where every process saves and exits.

In one process the watcher's SIGTERM handler is checked directly. Under
``mpiexec -n 2`` (JAX's preemption service switched off, as on hosts without it):
SIGTERM reaches rank 1 only, both ranks save at one step and exit 0, and the job
resumed from that checkpoint ends bit-identical to one never interrupted.
tests/test_demo.py covers the same with JAX's preemption service on, asked as one more
notice source.
"""

import gc
import importlib.util
import os
import signal
import threading

import numpy as np
import pytest

from dcheckpoint import CheckpointManager, read_metadata
from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._comm import LocalCommunicator
from dcheckpoint._options import CheckpointOptions
from dcheckpoint._preemption import PreemptionWatcher
from dcheckpoint._variable import Variable
from tests.mp_util import REPO_ROOT, results, run_launch


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sigterm_is_only_a_flag_until_the_next_step():
    before = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher(LocalCommunicator(), timeout_secs=5)
    try:
        assert not watcher.uses_jax
        assert watcher.reached(1) is False
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: only a flag is set
        assert watcher.notice_received
        assert watcher.reached(1) is False  # step 1 was already answered
        assert watcher.reached(2) is True  # one process: no exchange, no delay
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_only_jax_notices_are_watched(monkeypatch):
    from jax.experimental import multihost_utils

    from dcheckpoint import _preemption

    def in_a_thread(make):
        out = {}
        thread = threading.Thread(target=lambda: out.update(result=_caught(make)))
        thread.start()
        thread.join()
        return out["result"]

    before = signal.getsignal(signal.SIGTERM)
    # Without JAX's preemption service nothing could see a SIGTERM there: refused.
    refused = in_a_thread(lambda: PreemptionWatcher(LocalCommunicator(), timeout_secs=5))
    assert isinstance(refused, ValueError) and "main thread" in str(refused)
    # With it, JAX keeps SIGTERM and its sync point is the notice.
    monkeypatch.setattr(_preemption, "_jax_sync_manager_available", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda step: step == 3)
    watcher = in_a_thread(lambda: PreemptionWatcher(LocalCommunicator(), timeout_secs=5))
    try:
        assert watcher.uses_jax and signal.getsignal(signal.SIGTERM) is before
        assert [watcher.reached(s) for s in (1, 2, 3, 4)] == [False, False, True, True]
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) is before


def _caught(make):
    try:
        return make()
    except Exception as error:  # noqa: BLE001 (the error is the result)
        return error


def test_save_on_preemption_saves_the_agreed_step_and_exits(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    step = Variable(np.int32(0))
    weights = Variable(np.zeros(3, np.float32))
    manager = CheckpointManager(
        Checkpoint(step=step, weights=weights), tmp_path, max_to_keep=3,
        step_counter=step, checkpoint_interval=100, save_on_preemption=True,
    )
    options = CheckpointOptions(enable_async=True)
    saved = []
    with pytest.raises(SystemExit) as exited:
        for s in range(1, 50):
            step.assign(np.int32(s))
            weights.assign(np.full(3, s, np.float32))
            saved.append(manager.save(checkpoint_number=s, options=options,
                                      metadata={"s": s}))
            if s == 3:
                os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 0
    # Step 1 (the first save), then nothing until the notice: the interval (100) is
    # overridden at step 4, the first boundary after it; the save is committed on exit.
    assert [p for p in saved if p] == [str(tmp_path / "ckpt-1")]
    assert manager.all_steps() == [1, 4]
    assert manager.latest_step() == 4
    assert read_metadata(str(tmp_path / "ckpt-4")).user_metadata == {"step": 4, "s": 4}
    assert signal.getsignal(signal.SIGTERM) is before  # handed back on exit


def test_reached_preemption_needs_the_watcher(tmp_path):
    manager = CheckpointManager(Checkpoint(w=Variable(np.zeros(1))), tmp_path, max_to_keep=1)
    with pytest.raises(ValueError, match=r"needs CheckpointManager\(\.\.\., save_on_preemption"):
        manager.reached_preemption(1)


def test_a_dropped_manager_gives_sigterm_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    manager = CheckpointManager(Checkpoint(w=Variable(np.zeros(1))), tmp_path, max_to_keep=1,
                                save_on_preemption=True)
    assert signal.getsignal(signal.SIGTERM) is not before
    del manager
    gc.collect()
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_to_one_rank_under_mpiexec_resumes_bit_identical(tmp_path, monkeypatch):
    # Without JAX's preemption service (with it: tests/test_demo.py).
    monkeypatch.setenv("JAX_ENABLE_PREEMPTION_SERVICE", "false")
    demo = load_demo()
    args = demo.parse_args(["--steps", "16", "--save-every", "4", "--preempt-after", "5",
                            "--step-sleep", "0.2"])
    sigtermed = demo.run_sigtermed(tmp_path / "run", args)
    # Rank 1 got the notice; both ranks saved at the next step boundary and exited 0.
    assert sigtermed["exit_code"] == 0
    agreed = sigtermed["preemption_step"]
    notice = sigtermed["sigterm_after_step"]
    assert notice < agreed <= notice + 2  # within two step boundaries of the notice
    assert sigtermed["committed"][-1] == agreed
    assert f"ckpt-{agreed}" in os.listdir(tmp_path / "run")

    resumed, resumed_params = demo.run_to_end("resumed", tmp_path / "run", args, 2, 4, "4x2")
    assert resumed["start_step"] == agreed and resumed["step"] == 16
    baseline, baseline_params = demo.run_to_end("baseline", tmp_path / "base", args, 2, 4,
                                                "4x2")
    comparison = demo.compare(resumed_params, baseline_params)
    assert comparison["identical"] == {"w1": True, "b1": True, "w2": True, "b2": True}
    assert comparison["max_abs_diff"] == 0.0
    assert resumed["loss_hex"] == baseline["loss_hex"]


@pytest.mark.parametrize("jax_service", [False, True], ids=["own", "with JAX's service"])
def test_ranks_that_disagree_raise_instead_of_diverging(tmp_path, monkeypatch, jax_service):
    # With JAX's preemption service on, it is asked too, but our exchange still decides,
    # so ranks at different steps are an error there as well.
    if jax_service:
        monkeypatch.delenv("JAX_ENABLE_PREEMPTION_SERVICE", raising=False)
    else:
        monkeypatch.setenv("JAX_ENABLE_PREEMPTION_SERVICE", "false")
    completed = run_launch(REPO_ROOT / "tests" / "workers" / "misuse_worker.py", tmp_path,
                           processes=2, devices_per_process=1)
    rank0, rank1 = results(completed)
    assert rank0["uses_jax"] is rank1["uses_jax"] is jax_service
    # Every process agrees or nobody deletes: both ranks learn their call was not done.
    for rank in (rank0, rank1):
        assert rank["deleted"].startswith(
            "CoordinationError: The processes asked to delete different checkpoints")
    assert rank0["steps"] == rank1["steps"] == [1, 2, 3]
    assert rank0["checkpoints"] == rank1["checkpoints"] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    for rank in (rank0, rank1):
        assert rank["first"] is False
        assert rank["preemption"] == (
            "CoordinationError: Processes asked whether to save for a preemption at "
            "different steps [5, 6]; every process must call save() (or "
            "reached_preemption) once per step with the same step")
