"""A writer's lease on a checkpoint directory, so two managers never write one at once.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and
on NFSv3+), holding JSON that names its holder: host, pid, the pid's start time (so a
reused pid is not mistaken for the holder), the job id from the scheduler if any, when
it was taken, and the holder's lease in seconds. While it holds the lock, a background
thread of the holder renews the lease every ``lease_secs / 6`` by touching the file
(its mtime). A holder that crashed must not leave the directory locked for long, so a
lock is *expired*, and broken by the next writer, when:

* its holder ran on this host and that process is gone (pid missing, or now another
  process with a different start time): at once; or
* its holder ran on another host (so its process cannot be checked) and the file did
  not change while the next writer watched it for the holder's lease: the holder is
  not renewing. A lock already older than two leases by its mtime is broken without
  watching (the margin allows for clocks that disagree by up to one lease).

A live holder on this host is never broken, however old its lock. Watching compares
the file's mtime, inode and bytes, never two hosts' clocks, so clock skew cannot make
a renewing holder look dead. Breaking is itself serialised by a second ``O_EXCL``
file, so two writers that both find an expired lock do not both end up holding it.

Why a renewal thread rather than renewing on each save: a training job saves every
few minutes to hours, and a lease that must outlast the gap between saves is as long
as that gap, which is what locked restarted jobs out for hours. The thread renews as
long as the process lives, so the lease can be minutes whatever the save interval.
A holder that finds its lock file gone or taken over (it was stopped for longer than
its lease, say) marks the lock lost; `check` then raises, and the manager writes no
state file and deletes nothing more.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import time

from ._env import number_from_env
from .errors import CheckpointLockedError

__all__ = ["DirectoryLock", "LOCK_FILENAME", "DEFAULT_LEASE_SECS", "LEASE_VARIABLE"]

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".dcheckpoint.lock"
DEFAULT_LEASE_SECS = 180.0
# Overrides the default lease of every lock this process takes (seconds).
LEASE_VARIABLE = "DCHECKPOINT_LOCK_LEASE_SECS"
_BREAKING_SUFFIX = ".breaking"
_MAX_LOCK_BYTES = 4096
_LEASE_RANGE = (0.1, 24 * 3600.0)  # a holder's declared lease outside it is ignored
_RENEWALS_PER_LEASE = 6
# Scheduler variables naming the job, first found wins (shown in the error).
_JOB_VARIABLES = ("DCHECKPOINT_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID",
                  "JOB_ID", "FLUX_JOB_ID")


def _process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None (no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat_line[stat_line.rfind(")") + 2:].split()
    return int(fields[19])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_lease() -> float:
    low, high = _LEASE_RANGE
    return number_from_env(LEASE_VARIABLE, DEFAULT_LEASE_SECS,
                           valid=lambda lease: low <= lease <= high,
                           expected=f"seconds in {_LEASE_RANGE}")


class DirectoryLock:
    """An exclusive, crash-tolerant lease on one directory (see the module docstring).

    Usage::

        with DirectoryLock(directory):
            ...  # the only writer of `directory`

    Args:
      directory: the directory to lock (created if missing).
      lease_secs: how long after its holder stops renewing a lock held from another
        host may be broken (this lock's own lease, written into the file; others wait
        for the lease their holder wrote). Default: ``DCHECKPOINT_LOCK_LEASE_SECS``
        from the environment, else `DEFAULT_LEASE_SECS` (3 minutes).
      wait: whether `acquire` may watch another host's fresh lock for up to its lease
        to see whether it is renewed (True), or refuse it at once (False).
    """

    def __init__(self, directory, *, lease_secs: float | None = None, wait: bool = True):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_FILENAME)
        self.lease_secs = _default_lease() if lease_secs is None else float(lease_secs)
        if not _LEASE_RANGE[0] <= self.lease_secs <= _LEASE_RANGE[1]:
            raise ValueError(f"lease_secs must be in {_LEASE_RANGE}, got {lease_secs!r}")
        self.wait = wait
        self._token: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __repr__(self):
        return f"DirectoryLock({self.directory!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> DirectoryLock:
        """Takes the lock, breaking an expired one (this may watch it for one lease).

        Returns:
          self (so ``with DirectoryLock(d).acquire():`` reads naturally).
        Raises:
          CheckpointLockedError: a live writer holds the directory; the message names it.
          RuntimeError: this object already holds the lock.
        """
        if self._token is not None:
            raise RuntimeError(f"{self!r} is already held by this object")
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(3):  # a broken lock may be re-taken by another writer first
            if self._try_create():
                self._start_renewing()
                return self
            holder = self._read_holder()
            if holder is None:
                continue  # released between our attempt and the read
            if self._expired(holder):
                self._break(holder)
        raise CheckpointLockedError(
            f"Could not lock {self.directory!r}: other writers keep taking {self.path}"
        )

    def release(self) -> None:
        """Stops renewing and gives the lock up; removes the file only if still ours."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        self._renewer = None
        token, self._token = self._token, None
        if token is None:
            return
        holder = self._read_holder()
        if holder is not None and holder.get("token") == token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def refresh(self) -> None:
        """Renews the lease now (the background thread also does, every lease / 6)."""
        if self._token is not None:
            self._renew()

    def check(self) -> None:
        """Raises CheckpointLockedError unless this object still holds the lock.

        A holder stopped for longer than its lease (or whose file was deleted by hand)
        may have been taken over; it must then write nothing more into the directory.
        """
        if self._token is None:
            raise CheckpointLockedError(f"{self!r}: not held")
        if self._lost is None:
            self._renew()
        if self._lost is not None:
            raise CheckpointLockedError(
                f"Lost the lock on {self.directory!r}: {self._lost}. Another job may be "
                "writing the directory now; this one must not write to it."
            )

    def __enter__(self) -> DirectoryLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    # -- renewal -------------------------------------------------------------------

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._lost = None
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"dcheckpoint-lease {self.directory}", daemon=True
        )
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_secs / _RENEWALS_PER_LEASE):
            self._renew()
            if self._lost is not None:
                logger.error("lost the lock on %s: %s", self.directory, self._lost)
                return

    def _renew(self) -> None:
        """Touches the lock file if it is still ours; else marks the lock lost."""
        token = self._token
        try:
            holder = self._read_holder()
        except CheckpointLockedError as e:
            holder, why = {}, str(e)
        except OSError as e:  # a storage hiccup: the next renewal tries again
            logger.warning("could not read the lock %s to renew it: %s", self.path, e)
            return
        else:
            why = "the lock file was removed" if holder is None else (
                f"the lock file now names host {holder.get('host')!r}, pid "
                f"{holder.get('pid')!r}")
        if token is None or holder is None or holder.get("token") != token:
            self._lost = why
            return
        try:
            os.utime(self.path, follow_symlinks=False)
        except OSError as e:  # a storage hiccup: the next renewal tries again
            logger.warning("could not renew the lock %s: %s", self.path, e)

    # -- taking and breaking ---------------------------------------------------------

    def _try_create(self) -> bool:
        token = os.urandom(8).hex()
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_ticks": _process_start_ticks(os.getpid()),
            "job": next((os.environ[v] for v in _JOB_VARIABLES if os.environ.get(v)), None),
            "acquired_at": time.time(),
            "lease_secs": self.lease_secs,
            "token": token,
        }
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
            f.flush()
            os.fsync(f.fileno())
        self._token = token
        return True

    def _read_holder(self) -> dict | None:
        """The lock file's content; {} when unreadable (a holder crashed mid-write).

        Raises:
          CheckpointLockedError: the lock path is not a regular file (a FIFO would
            block the read forever; a directory or link is not a lock of ours).
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP):
                raise
            raise CheckpointLockedError(
                f"{self.path} is not a regular file; expected a dcheckpoint lock file. "
                "Remove it by hand if no job is writing this directory."
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CheckpointLockedError(
                f"{self.path} is not a regular file; expected a dcheckpoint lock "
                "file. Remove it by hand if no job is writing this directory."
            )
        with os.fdopen(fd, "rb") as f:
            data = f.read(_MAX_LOCK_BYTES)
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        if not isinstance(holder, dict):
            holder = {}
        holder["_mtime"] = st.st_mtime
        holder["_seen"] = (st.st_ino, st.st_mtime_ns, data)
        return holder

    def _holder_lease(self, holder: dict) -> float:
        lease = holder.get("lease_secs")
        if type(lease) in (int, float) and _LEASE_RANGE[0] <= lease <= _LEASE_RANGE[1]:
            return float(lease)
        return self.lease_secs  # an old or damaged lock file: our own lease

    def _expired(self, holder: dict) -> bool:
        """Whether ``holder`` no longer holds the directory (may watch it for a lease).

        Raises:
          CheckpointLockedError: it is alive, or its lease is not over and we may not wait.
        """
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and type(pid) is int and pid > 0:
            if not _pid_alive(pid):
                return True
            ticks = holder.get("pid_start_ticks")
            if ticks is not None and _process_start_ticks(pid) not in (None, ticks):
                return True
            # Alive on this host: never broken, however old.
            raise CheckpointLockedError(self._locked_message(holder, "its process is alive"))
        lease = self._holder_lease(holder)
        if time.time() - holder["_mtime"] > 2 * lease:
            return True
        if not self.wait:
            raise CheckpointLockedError(self._locked_message(
                holder, f"its lease of {lease:.0f} s may still be renewed"))
        # Watch the file for one lease: a live holder touches it every lease / 6.
        deadline = time.monotonic() + lease
        while time.monotonic() < deadline:
            time.sleep(min(1.0, lease / 20))
            current = self._read_holder()
            if current is None:
                return False  # released: try to create it again
            if current["_seen"] != holder["_seen"]:
                raise CheckpointLockedError(self._locked_message(
                    current, "its holder renewed the lease while we watched"))
        logger.warning("breaking the lock %s: not renewed for its %.0f s lease (%s)",
                       self.path, lease, self._describe(holder))
        return True

    def _break(self, stale: dict) -> None:
        """Removes the expired lock, unless another writer broke and re-took it meanwhile."""
        breaking = self.path + _BREAKING_SUFFIX
        try:
            fd = os.open(breaking, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o644)
        except FileExistsError:
            # Another writer is breaking it; a breaker that crashed leaves an old file.
            try:
                if time.time() - os.lstat(breaking).st_mtime > 60:
                    os.remove(breaking)
            except FileNotFoundError:
                pass
            return
        os.close(fd)
        try:
            current = self._read_holder()
            if current is not None and current["_seen"] == stale["_seen"]:
                os.remove(self.path)
        finally:
            os.remove(breaking)

    @staticmethod
    def _describe(holder: dict) -> str:
        started = holder.get("acquired_at")
        when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
                if type(started) in (int, float) and 0 <= started < 2**40 else repr(started))
        return (f"host {holder.get('host')!r}, pid {holder.get('pid')!r}, job "
                f"{holder.get('job')!r}, taken at {when}, lease "
                f"{holder.get('lease_secs')!r} s, last renewed "
                f"{time.time() - holder['_mtime']:.0f} s ago")

    def _locked_message(self, holder: dict, why: str) -> str:
        return (
            f"Checkpoint directory {self.directory!r} is locked by another writer "
            f"({why}): {self._describe(holder)} ({self.path}). Expected no other "
            "writer; if that job is really gone, wait for its lease to pass or delete "
            "the lock file (see docs/RELIABILITY.md)."
        )
