"""DirectoryLock: one writer per directory, and no lock stuck by a crashed holder."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dcheckpoint._lock import LOCK_FILENAME, DirectoryLock, _process_start_ticks
from dcheckpoint.errors import CheckpointError, CheckpointLockedError
from tests.mp_util import REPO_ROOT

HOLD = textwrap.dedent("""
    import os, sys, time
    from dcheckpoint._lock import DirectoryLock
    lock = DirectoryLock(sys.argv[1])
    try:
        lock.acquire()
    except Exception as e:
        print("REFUSED", type(e).__name__, flush=True)
        sys.exit(0)
    print("ACQUIRED", os.getpid(), flush=True)
    if sys.argv[2] == "crash":
        os.kill(os.getpid(), 9)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def _python(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", HOLD, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, text=True, **kwargs)


def _write_lock(directory, **holder):
    with open(os.path.join(directory, LOCK_FILENAME), "w") as f:
        json.dump(holder, f)


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    with DirectoryLock(tmp_path) as first:
        assert first.held
        with pytest.raises(CheckpointLockedError, match=rf"pid {os.getpid()}\b") as info:
            DirectoryLock(tmp_path).acquire()
        assert isinstance(info.value, CheckpointError)
        assert "locked by another writer" in str(info.value)
    assert not os.path.exists(tmp_path / LOCK_FILENAME)
    DirectoryLock(tmp_path).acquire().release()  # free again


def test_live_holder_in_another_process_is_refused_until_it_is_killed(tmp_path):
    holder = _python(tmp_path, 60)
    line = holder.stdout.readline().split()
    assert line[0] == "ACQUIRED"
    try:
        with pytest.raises(CheckpointLockedError, match=rf"pid {line[1]}\b"):
            DirectoryLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with DirectoryLock(tmp_path) as lock:  # the dead holder's lock is broken
        assert lock.held


def test_a_crashed_holder_does_not_leave_the_directory_locked(tmp_path):
    crashed = _python(tmp_path, "crash")
    assert crashed.stdout.readline().startswith("ACQUIRED")
    assert crashed.wait() == -signal.SIGKILL
    assert os.path.exists(tmp_path / LOCK_FILENAME)  # left behind by the crash
    lock = DirectoryLock(tmp_path).acquire()
    with open(tmp_path / LOCK_FILENAME) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    # Our own pid, alive, but with another start time: the holder was an earlier process.
    _write_lock(tmp_path, host=os.uname().nodename, pid=os.getpid(),
                pid_start_ticks=_process_start_ticks(os.getpid()) - 1, acquired_at=0)
    with DirectoryLock(tmp_path) as lock:
        assert lock.held


@pytest.mark.parametrize("age_secs, broken", [(10.0, False), (7200.0, True)])
def test_another_hosts_lock_is_broken_at_once_only_when_two_leases_old(
        tmp_path, age_secs, broken):
    _write_lock(tmp_path, host="some-other-host", pid=12345, acquired_at=0, lease_secs=3600)
    past = time.time() - age_secs
    os.utime(tmp_path / LOCK_FILENAME, (past, past))
    lock = DirectoryLock(tmp_path, wait=False)
    if broken:
        lock.acquire().release()
    else:
        with pytest.raises(CheckpointLockedError, match="host 'some-other-host', pid 12345"):
            lock.acquire()


def test_an_unreadable_lock_file_is_refused_while_fresh_and_broken_when_old(tmp_path):
    (tmp_path / LOCK_FILENAME).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointLockedError, match="host None"):
        DirectoryLock(tmp_path, wait=False).acquire()
    os.utime(tmp_path / LOCK_FILENAME, (0, 0))
    DirectoryLock(tmp_path, lease_secs=60, wait=False).acquire().release()


def test_a_fresh_lock_of_a_dead_job_on_another_host_is_taken_over_after_its_lease(tmp_path):
    # The restarted job runs elsewhere: the dead holder's pid cannot be checked, and its
    # lock file was touched just now. Nobody renews it, so it goes after its lease.
    _write_lock(tmp_path, host="node-a", pid=4242, job="777", acquired_at=time.time(),
                lease_secs=1.0, token="dead")
    with DirectoryLock(tmp_path) as lock:
        assert lock.held
        holder = json.loads((tmp_path / LOCK_FILENAME).read_text())
        assert holder["pid"] == os.getpid() and holder["token"] != "dead"


RENEWING_HOLDER = textwrap.dedent("""
    import socket, sys, time
    socket.gethostname = lambda: "node-a"  # the holder runs on another host
    from dcheckpoint._lock import DirectoryLock
    lock = DirectoryLock(sys.argv[1], lease_secs=1.0).acquire()
    print("ACQUIRED", flush=True)
    time.sleep(60)
""")


def test_a_live_renewing_holder_on_another_host_is_never_taken_over(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    holder = subprocess.Popen([sys.executable, "-c", RENEWING_HOLDER, str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ACQUIRED"
        for _ in range(3):  # each try watches the file for the holder's 1 s lease
            with pytest.raises(CheckpointLockedError,
                               match=r"renewed the lease.*host 'node-a', pid \d+, job"):
                DirectoryLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # Killed: nobody renews any more, and the next writer takes over after the lease.
    with DirectoryLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == os.getpid()
        assert lock.held


def test_a_holder_that_was_taken_over_knows_it_lost_the_lock(tmp_path):
    lock = DirectoryLock(tmp_path, lease_secs=60).acquire()
    lock.check()
    os.remove(tmp_path / LOCK_FILENAME)  # broken by hand, then taken by another job
    _write_lock(tmp_path, host="node-b", pid=99, token="theirs")
    with pytest.raises(CheckpointLockedError, match="Lost the lock.*host 'node-b', pid 99"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILENAME).read_text())["token"] == "theirs"


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_lock_path_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    path = tmp_path / LOCK_FILENAME
    os.mkfifo(path) if kind == "fifo" else os.mkdir(path)
    with pytest.raises(CheckpointLockedError, match="not a regular file"):
        DirectoryLock(tmp_path, wait=False).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = DirectoryLock(tmp_path).acquire()
    _write_lock(tmp_path, host="other", pid=1, token="theirs")
    lock.release()
    assert json.loads((tmp_path / LOCK_FILENAME).read_text())["token"] == "theirs"


def test_racing_writers_exactly_one_wins(tmp_path):
    # A stale lock from a dead process first, so the racers also race to break it.
    _write_lock(tmp_path, host=os.uname().nodename, pid=2**22 + 12345, acquired_at=0)
    racers = [_python(tmp_path, 3) for _ in range(4)]
    outcomes = [p.stdout.readline().split()[0] for p in racers]
    for p in racers:
        p.wait()
    assert sorted(outcomes) == ["ACQUIRED", "REFUSED", "REFUSED", "REFUSED"]
