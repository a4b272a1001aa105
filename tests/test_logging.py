"""Every save and restore logs its path, bytes, seconds, GB/s and the caller's blocked time."""

import logging
import re

import numpy as np

from dcheckpoint import Checkpoint, CheckpointManager, CheckpointOptions, Variable

LINE = re.compile(r"^(saved|restored) (\S+): (\d+) bytes in ([\d.]+) s \(([\d.e+-]+|inf) GB/s\)"
                  r"(?:, caller blocked ([\d.]+) s)?$")


def records(caplog, op):
    found = [r for r in caplog.records
             if r.name == "dcheckpoint" and getattr(r, "dcheckpoint", {}).get("op") == op]
    for r in found:
        assert LINE.match(r.getMessage()), r.getMessage()
    return found


def make():
    # 1000 float32 (4000 B) + 10 int32 (40 B); save_counter (int32, 4 B) on save().
    return Checkpoint(w=Variable(np.ones(1000, np.float32)),
                      step=Variable(np.arange(10, dtype=np.int32)))


def test_a_sync_save_and_its_restore_log_their_sizes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dcheckpoint")
    path = make().save(tmp_path / "ckpt")
    (save,) = records(caplog, "save")
    fields = save.dcheckpoint
    assert fields["path"] == path and fields["bytes"] == 4044
    assert fields["seconds"] > 0
    assert fields["blocked_secs"] >= fields["seconds"]  # a sync save blocks for all of it
    assert save.getMessage().startswith(f"saved {path}: 4044 bytes in ")

    make().restore(path).assert_consumed()
    (restore,) = records(caplog, "restore")
    assert restore.dcheckpoint["path"] == path and restore.dcheckpoint["bytes"] == 4044
    assert restore.getMessage().startswith(f"restored {path}: 4044 bytes in ")


def test_a_partial_restore_logs_only_what_it_restored(tmp_path, caplog):
    path = make().save(tmp_path / "ckpt")
    caplog.set_level(logging.INFO, logger="dcheckpoint")
    Checkpoint(w=Variable(np.zeros(1000, np.float32))).read(path).expect_partial()
    (restore,) = records(caplog, "restore")
    assert restore.dcheckpoint["bytes"] == 4000


def test_an_async_save_logs_the_time_the_caller_was_blocked(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dcheckpoint")
    manager = CheckpointManager(make(), tmp_path, max_to_keep=2)
    path = manager.save(options=CheckpointOptions(enable_async=True))
    manager.sync()
    (save,) = records(caplog, "save")
    assert save.dcheckpoint["path"] == path and save.dcheckpoint["bytes"] == 4044
    assert 0 <= save.dcheckpoint["blocked_secs"]
    assert re.search(r", caller blocked [\d.]+ s$", save.getMessage())


def test_nothing_is_logged_at_info_by_default(tmp_path, capsys):
    make().save(tmp_path / "ckpt")  # no handler configured: the library stays quiet
    captured = capsys.readouterr()
    assert "saved" not in captured.err and "saved" not in captured.out


def test_save_pytree_and_restore_pytree_log_too(tmp_path, caplog):
    from dcheckpoint import restore_pytree, save_pytree

    caplog.set_level(logging.INFO, logger="dcheckpoint")
    tree = {"a": np.ones(8, np.float32), "b": [np.zeros(2, np.int32)]}
    path = save_pytree(str(tmp_path / "tree"), tree)
    restore_pytree(path, {"a": None, "b": [None]})
    (save,) = records(caplog, "save")
    (restore,) = records(caplog, "restore")
    assert save.dcheckpoint["bytes"] == restore.dcheckpoint["bytes"] == 40
    assert save.dcheckpoint["path"] == restore.dcheckpoint["path"] == path
