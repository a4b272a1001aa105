"""A writer's lock on a checkpoint directory, so two managers never write one at once.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and
on NFSv3+), holding JSON that names its holder: host, pid, the pid's start time (so a
reused pid is not mistaken for the holder) and when it was taken. A holder that
crashed must not leave the directory locked forever, so a lock is *stale*, and is
broken by the next writer, when:

* its holder ran on this host and that process is gone (pid missing, or now another
  process with a different start time); or
* it is older than ``stale_after_secs`` (by the file's mtime, which ``refresh()``
  renews) and its holder cannot be checked (another host).

A live holder on this host is never broken, however old its lock. Breaking is itself
serialised by a second ``O_EXCL`` file, so two writers that both find a stale lock do
not both end up holding the directory.
"""

from __future__ import annotations

import json
import os
import socket
import time

from .errors import CheckpointLockedError

__all__ = ["DirectoryLock", "LOCK_FILENAME"]

LOCK_FILENAME = ".dcheckpoint.lock"
_BREAKING_SUFFIX = ".breaking"
_MAX_LOCK_BYTES = 4096


def _process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None (no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """An exclusive, crash-tolerant lock on one directory (see the module docstring).

    Usage::

        with DirectoryLock(directory):
            ...  # the only writer of `directory`

    Args:
      directory: the directory to lock (created if missing).
      stale_after_secs: age after which a lock whose holder cannot be checked (another
        host) is considered abandoned. Holders should ``refresh()`` more often.
    """

    def __init__(self, directory, *, stale_after_secs: float = 6 * 3600.0):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_FILENAME)
        self.stale_after_secs = stale_after_secs
        self._token: str | None = None

    def __repr__(self):
        return f"DirectoryLock({self.directory!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> DirectoryLock:
        """Takes the lock, breaking a stale one.

        Returns:
          self (so ``with DirectoryLock(d).acquire():`` reads naturally).
        Raises:
          CheckpointLockedError: a live writer holds the directory; the message names it.
          RuntimeError: this object already holds the lock.
        """
        if self._token is not None:
            raise RuntimeError(f"{self!r} is already held by this object")
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(3):  # a broken stale lock may be re-taken by another writer first
            if self._try_create():
                return self
            holder = self._read_holder()
            if holder is None:
                continue  # released between our attempt and the read
            why_stale = self._why_stale(holder)
            if why_stale is None:
                raise CheckpointLockedError(self._locked_message(holder))
            self._break(holder)
        raise CheckpointLockedError(
            f"Could not lock {self.directory!r}: other writers keep taking {self.path}"
        )

    def release(self) -> None:
        """Gives the lock up; removes the file only if it is still ours."""
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
        """Renews the lock's mtime, so other hosts do not take it for abandoned."""
        if self._token is not None:
            os.utime(self.path)

    def __enter__(self) -> DirectoryLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------

    def _try_create(self) -> bool:
        token = os.urandom(8).hex()
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_ticks": _process_start_ticks(os.getpid()),
            "acquired_at": time.time(),
            "token": token,
        }
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
            f.flush()
            os.fsync(f.fileno())
        self._token = token
        return True

    def _read_holder(self) -> dict | None:
        """The lock file's content; {} when unreadable (a holder crashed mid-write)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(_MAX_LOCK_BYTES)
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        if not isinstance(holder, dict):
            holder = {}
        holder["_mtime"] = mtime
        holder["_raw"] = data.decode(errors="replace")
        return holder

    def _why_stale(self, holder: dict) -> str | None:
        """Why ``holder`` no longer holds the directory, or None if it may be alive."""
        age = time.time() - holder["_mtime"]
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and type(pid) is int and pid > 0:
            if not _pid_alive(pid):
                return f"process {pid} is gone"
            ticks = holder.get("pid_start_ticks")
            if ticks is not None and _process_start_ticks(pid) not in (None, ticks):
                return f"pid {pid} now belongs to another process"
            return None  # alive on this host: never broken, however old
        if age > self.stale_after_secs:
            return f"it is {age:.0f} s old (limit {self.stale_after_secs:.0f} s)"
        return None

    def _break(self, stale: dict) -> None:
        """Removes the stale lock, unless another writer broke and re-took it meanwhile."""
        breaking = self.path + _BREAKING_SUFFIX
        try:
            fd = os.open(breaking, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            # Another writer is breaking it; a breaker that crashed leaves an old file.
            try:
                if time.time() - os.stat(breaking).st_mtime > 60:
                    os.remove(breaking)
            except FileNotFoundError:
                pass
            return
        os.close(fd)
        try:
            current = self._read_holder()
            if current is not None and current["_raw"] == stale["_raw"]:
                os.remove(self.path)
        finally:
            os.remove(breaking)

    def _locked_message(self, holder: dict) -> str:
        age = time.time() - holder["_mtime"]
        return (
            f"Checkpoint directory {self.directory!r} is locked by another writer: "
            f"host {holder.get('host')!r}, pid {holder.get('pid')!r}, lock taken "
            f"{age:.0f} s ago ({self.path}). Expected no other writer; if that process "
            "is really gone, delete the lock file."
        )
