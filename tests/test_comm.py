"""dcheckpoint._comm: gather / broadcast / barrier, in one process and under mpiexec."""

from pathlib import Path

import pytest

from dcheckpoint import _comm
from dcheckpoint.errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CoordinationError,
    CoordinationTimeoutError,
)
from tests.mp_util import results, run_launch

WORKERS = Path(__file__).parent / "workers"
HINT = "a peer process may have crashed or be stuck; possible fixes:"
RESTART = ("the job's processes are out of step, so every later checkpoint call fails: "
           "restart the job (every process) and resume from its latest checkpoint")


def test_local_communicator_returns_its_own_payloads():
    comm = _comm.LocalCommunicator()
    assert (comm.process_index, comm.process_count, comm.is_coordinator) == (0, 1, True)
    assert comm.gather(b"manifest", tag="save manifests", timeout_secs=1) == [b"manifest"]
    assert comm.broadcast(b"ok", tag="commit outcome", timeout_secs=1) == b"ok"
    comm.barrier(tag="done", timeout_secs=1)


def test_coordinator_must_broadcast_bytes():
    with pytest.raises(ValueError, match="coordinator must pass bytes to broadcast commit"):
        _comm.LocalCommunicator().broadcast(None, tag="commit", timeout_secs=1)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_secs must be positive, got 0"):
        _comm.LocalCommunicator().gather(b"", tag="x", timeout_secs=0)


def test_default_communicator_of_a_single_process_is_local_and_cached():
    comm = _comm.default_communicator()
    assert isinstance(comm, _comm.LocalCommunicator)
    assert _comm.default_communicator() is comm


def test_timeout_error_is_a_coordination_timeout_and_a_timeout():
    assert issubclass(CoordinationTimeoutError, TimeoutError)


@pytest.mark.parametrize("processes", [2, 3])
def test_collectives_and_timeouts_under_mpiexec(processes):
    completed = run_launch(
        WORKERS / "comm_worker.py", processes=processes, devices_per_process=1, timeout=60
    )
    ranks = results(completed)
    assert [r["rank"] for r in ranks] == list(range(processes))
    last = processes - 1
    # Payload r is 22 bytes of JSON plus r * 200 KB of padding.
    gathered = [[22 + 200_000 * r, r] for r in range(processes)]
    for rank, result in enumerate(ranks):
        assert result["default_type"] == "MPICommunicator"
        assert result["default_is_cached"] is True
        for kind in ("mpi", "jax"):
            assert result[kind] == {
                "gathered": gathered if rank == 0 else None,
                "broadcast": "decision",
                "index": rank,
                "count": processes,
            }
        # The background thread's broadcast and the user's Allreduce(rank) both completed.
        assert result["beside_user_mpi"] == f"background:{sum(range(processes))}"
        for kind in ("mpi_timeouts", "jax_timeouts"):
            errors = result[kind]
            if rank == 0:
                assert errors["gather"] == (
                    f"Timed out after 0.5s waiting for save manifests from processes [{last}]: "
                    f"{HINT} look for an earlier error in the other processes' output; make "
                    "sure every process makes the same checkpoint calls in the same order; "
                    "raise CheckpointOptions(timeout_secs=...) if storage is slow. "
                    f"Checkpointing in this job cannot continue: {RESTART}"
                )
                assert "broadcast" not in errors
            else:
                # Small payloads are sent eagerly: a sender does not wait for the receiver.
                assert errors.get("gather") is None
                # Its own timeout, or (3 processes) the abort of a peer that timed out
                # first: either way at once, and saying the job must restart.
                assert errors["broadcast"].startswith((
                    f"Timed out after 0.5s waiting for commit outcome from processes [0]: {HINT}",
                    "Process 1 gave up on the job's checkpoint coordination while this "
                    "process was in commit outcome (commit outcome failed on process 1: "
                    "Timed out after 0.5s",
                    "Process 2 gave up on the job's checkpoint coordination while this "
                    "process was in commit outcome (commit outcome failed on process 2: "
                    "Timed out after 0.5s",
                )), errors["broadcast"]
                assert errors["broadcast"].endswith(RESTART)
            if rank == last:
                assert "gather" not in errors
            # After either timeout every process's next collective fails at once (no
            # waiting, no stale message taken for a new one), saying the job must restart.
            for after in ("after_gather", "after_broadcast"):
                assert errors[after].startswith(
                    "CoordinationError: Cannot run the next collective: checkpoint "
                    "coordination stopped after an earlier failure ("), errors[after]
                assert errors[after].endswith(f"); {RESTART}")


def test_agree_returns_the_decided_value_and_passes_values_in_process_order():
    comm = _comm.LocalCommunicator()
    seen = []

    def decide(values):
        seen.append(values)
        return {"id": "abc"}

    assert _comm.agree(comm, {"path": "/d"}, decide, kind="save", tag="t",
                       timeout_secs=1) == {"id": "abc"}
    assert seen == [[{"path": "/d"}]]


@pytest.mark.parametrize(("raised", "expected"), [
    (OSError(28, "No space left on device"), CheckpointError),
    (CheckpointLockedError("held by pid 7"), CheckpointLockedError),
    (CheckpointMismatchError("shape (2,) vs (3,)"), CheckpointMismatchError),
    (KeyError("x"), CheckpointError),
])
def test_agree_raises_the_closest_library_error_chained_to_the_original(raised, expected):
    def decide(values):
        raise raised

    with pytest.raises(CheckpointError) as info:
        _comm.agree(_comm.LocalCommunicator(), None, decide, kind="k", tag="t",
                    timeout_secs=1)
    assert type(info.value) is expected
    assert info.value.__cause__ is raised
    if not isinstance(raised, CheckpointError):
        assert str(info.value).startswith(f"{type(raised).__name__}: ")


def test_a_message_of_another_collective_is_recognised_not_decoded():
    message = _comm._frame(4, b'{"outcome": "old"}')
    assert _comm._unframe(message, 4, sender=1, tag="t") == b'{"outcome": "old"}'
    with pytest.raises(CoordinationError, match=(
            r"Process 1 sent collective #4 where this process expected collective #6 "
            r"\(save outcome\): the job's processes are out of step")):
        _comm._unframe(message, 6, sender=1, tag="save outcome")
    with pytest.raises(CoordinationError, match="a message too short to be ours"):
        _comm._unframe(b"{}", 0, sender=1, tag="t")


def test_a_broken_communicator_fails_every_later_collective_at_once():
    comm = _comm.LocalCommunicator()
    comm._break("save manifests timed out on process 0")
    assert comm.broken == "save manifests timed out on process 0"
    with pytest.raises(CoordinationError, match=(
            r"Cannot run save identity: checkpoint coordination stopped after an earlier "
            r"failure \(save manifests timed out on process 0\); the job's processes are "
            r"out of step")):
        comm.gather(b"", tag="save identity", timeout_secs=1)


def test_collectives_run_in_issue_order_on_one_thread():
    order = []
    futures = [_comm.submit(lambda n=n: order.append(n)) for n in range(5)]
    for future in futures:
        future.result()
    assert order == list(range(5))
    # From the collectives thread itself, run_ordered runs at once (no self-deadlock).
    assert _comm.submit(lambda: _comm.run_ordered(lambda: "inline")).result() == "inline"
