"""Storage faults, injected for real: a full disk (a small tmpfs this test mounts), a
read-only directory (a read-only bind mount: root ignores permission bits), a file
removed underneath a restore. Each gives a clear error and leaves the previous
checkpoints intact and restorable."""

import contextlib
import errno
import os
import subprocess

import numpy as np
import pytest

from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._engine import read_metadata, restore_arrays
from dcheckpoint._manager import CheckpointManager
from dcheckpoint._variable import Variable
from dcheckpoint.errors import CheckpointError, CorruptCheckpointError
from tests.ckpt_files import array_dir

SMALL = 16 * 1024  # bytes of the checkpoint that fits
BIG = 256 * 1024  # bytes of the one that cannot fit once the disk is nearly full


def _mount(*args):
    done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"mount {' '.join(map(str, args))} failed (this test needs root and "
                    f"mount(2)): {done.stderr}")


@contextlib.contextmanager
def _tmpfs(path, size_bytes):
    os.makedirs(path)
    _mount("-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def _read_only(path):
    """Makes ``path`` read-only for everyone, root included (a read-only bind mount)."""
    _mount("--bind", path, path)
    try:
        _mount("-o", "remount,bind,ro", path)
        probe = os.path.join(path, "probe")
        with pytest.raises(OSError) as info:
            open(probe, "w")
        assert info.value.errno == errno.EROFS  # really read-only, not just mode bits
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _fill(path):
    """Writes ``path`` until the disk is full."""
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)


def _manager(directory, n_floats):
    weights = Variable(np.zeros(n_floats, np.float32))
    return CheckpointManager(Checkpoint(weights=weights), directory, max_to_keep=5), weights


def _restored(path, n_floats):
    weights = Variable(np.zeros(n_floats, np.float32))
    Checkpoint(weights=weights).restore(path)
    return np.asarray(weights.value)


def _values(n_floats, number):
    return np.arange(n_floats, dtype=np.float32) + number


def _leftovers(directory):
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n)


def test_disk_full_mid_save_at_every_fill_level(tmp_path):
    n = SMALL // 4
    with _tmpfs(tmp_path / "disk", 1024 * 1024) as disk:
        directory = os.path.join(disk, "run")
        manager, weights = _manager(directory, n)
        weights.assign(_values(n, 1))
        first = manager.save(checkpoint_number=1)
        outcomes = {"ok": 0, "ENOSPC": 0}
        filler = os.path.join(disk, "filler")
        for free_pages in range(0, 14):  # leave 0..52 KiB: the save fails in every phase
            _fill(filler)
            os.truncate(filler, os.path.getsize(filler) - free_pages * 4096)
            weights.assign(_values(n, 2))
            try:
                second = manager.save(checkpoint_number=2)
            except CheckpointError as e:
                # Either the save failed, or it committed and the state file update
                # failed (the message says the checkpoint is committed): never a raw
                # OSError.
                assert "No space left on device" in str(e), e
                outcomes["ENOSPC"] += 1
            else:
                np.testing.assert_array_equal(_restored(second, n), _values(n, 2))
                outcomes["ok"] += 1
            # The previous checkpoint is intact and restorable.
            np.testing.assert_array_equal(_restored(first, n), _values(n, 1))
            os.remove(filler)
            # What a failed save left, a new manager removes; it finds a checkpoint.
            manager, weights = _manager(directory, n)
            assert _leftovers(directory) == []
            assert manager.latest_checkpoint in (first, os.path.join(directory, "ckpt-2"))
        assert outcomes["ENOSPC"] >= 3 and outcomes["ok"] >= 1, outcomes


def test_disk_full_for_a_big_save_then_recovers(tmp_path):
    with _tmpfs(tmp_path / "disk", 128 * 1024) as disk:
        directory = os.path.join(disk, "run")
        manager, weights = _manager(directory, BIG // 4)
        weights.assign(_values(BIG // 4, 1))
        with pytest.raises(CheckpointError, match=r"ckpt-1.*weights/c/0.*No space left"):
            manager.save(checkpoint_number=1)
        assert manager.latest_checkpoint is None
        weights = Variable(np.zeros(16, np.float32))  # a smaller state fits
        manager = CheckpointManager(Checkpoint(weights=weights), directory, max_to_keep=5)
        assert _leftovers(directory) == []
        weights.assign(_values(16, 2))
        np.testing.assert_array_equal(_restored(manager.save(), 16), _values(16, 2))


def test_read_only_directory(tmp_path):
    directory = str(tmp_path / "run")
    n = 64
    manager, weights = _manager(directory, n)
    weights.assign(_values(n, 1))
    first = manager.save(checkpoint_number=1)
    with _read_only(directory):
        weights.assign(_values(n, 2))
        with pytest.raises(CheckpointError, match="Read-only file system"):
            manager.save(checkpoint_number=2)
        np.testing.assert_array_equal(_restored(first, n), _values(n, 1))
        # A new manager can still start on it and find the latest checkpoint.
        reader, _ = _manager(directory, n)
        assert reader.latest_checkpoint == first
    weights.assign(_values(n, 3))
    third = manager.save(checkpoint_number=3)  # writable again: saving works again
    np.testing.assert_array_equal(_restored(third, n), _values(n, 3))


def test_file_removed_underneath_a_restore(tmp_path):
    directory = str(tmp_path / "run")
    n = 64
    manager, weights = _manager(directory, n)
    paths = []
    for number in (1, 2):
        weights.assign(_values(n, number))
        paths.append(manager.save(checkpoint_number=number))
    # The metadata was read, then a chunk disappears before the data is read.
    metadata = read_metadata(paths[1])
    os.remove(array_dir(paths[1], "weights") / "c" / "0")
    with pytest.raises(CorruptCheckpointError, match=r"Array 'weights'.*missing"):
        restore_arrays(paths[1], {"weights": None}, metadata=metadata)
    # The array's zarr.json removed: named too.
    os.remove(array_dir(paths[1], "weights") / "zarr.json")
    with pytest.raises(CorruptCheckpointError, match=r"Array 'weights'"):
        restore_arrays(paths[1], {"weights": None}, metadata=metadata)
    np.testing.assert_array_equal(_restored(paths[0], n), _values(n, 1))
