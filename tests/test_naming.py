"""One naming rule for both APIs: any key a user can write round-trips, within the file
system's name limits, and either API reads what the other wrote under the user's keys."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dcheckpoint
from dcheckpoint import AutoTrackable, Checkpoint, Variable
from dcheckpoint._metadata import _digest
from dcheckpoint._paths import (
    check_storage_path,
    escape,
    join_path,
    split_path,
    storage_paths,
    unescape,
)
from dcheckpoint.errors import CheckpointMismatchError, CorruptCheckpointError
from tests.mp_util import REPO_ROOT, results, run_launch

# Keys users write, and the ones that broke: a 30-character CJK key made a 450-byte
# file name; "sp ace" was "sp%20ace" for Checkpoint but "sp ace" for save_pytree.
KEYS = [
    "sp ace", "a/b", "..", ".", "__x", "", "ü" * 100, "x" * 300, "日本語の鍵" * 6,
    "W", "w", "zarr.json", "dcheckpoint.json", "100%", "%2F", "%00", "-rf", "c",
    "looks--0123456789abcdef", "tab\tnew\nline", "emoji 🙂", "Dense_0", "kernel",
]


def _tree():
    return {key: np.full((2,), i, np.int32) for i, key in enumerate(KEYS)}


def _zeros():
    return {key: np.zeros((2,), np.int32) for key in KEYS}


def _assert_tree(got, expected=None):
    expected = _tree() if expected is None else expected
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=repr(key))


def _names_on_disk(root):
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            yield directory, name


def _assert_fits_file_systems(checkpoint):
    by_folded = {}
    for directory, name in _names_on_disk(checkpoint):
        assert len(name.encode()) <= 255, name
        other = by_folded.setdefault((directory, name.casefold()), name)
        assert other == name, f"{other!r} and {name!r} clash on a case-insensitive disk"


def test_escape_keeps_keys_readable_and_only_escapes_what_it_must():
    assert escape("sp ace") == "sp ace"
    assert escape("ü" * 3) == "üüü"
    assert escape("a/b") == "a%2Fb"
    assert escape("100%") == "100%25"
    assert escape("") == "%00"
    assert escape("%00") == "%2500"
    assert escape(7) == "7"
    assert join_path(["t", "a/b", ""]) == "t/a%2Fb/%00"
    assert split_path("t/a%2Fb/%00") == ["t", "a/b", ""]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=6, unique=True))
def test_escape_is_one_to_one_and_storage_names_fit(keys):
    components = [escape(k) for k in keys]
    assert [unescape(c) for c in components] == keys
    assert len(set(components)) == len(keys)
    assert all(c and "/" not in c for c in components)
    paths = ["top/" + c for c in components]
    stored = storage_paths(paths)
    assert len({s.casefold() for s in stored.values()}) == len(paths)
    for path, storage in stored.items():
        assert check_storage_path(storage, array=path) == storage
        assert all(len(part.encode()) <= 255 for part in storage.split("/"))


def test_storage_names_are_plain_when_they_can_be_and_short_otherwise():
    stored = storage_paths(["model/Dense_0/kernel", "t/sp ace", "t/" + escape("ü" * 100),
                            "t/" + escape("x" * 300), "t/W", "t/w", "t/..", "t/zarr.json"])
    assert stored["model/Dense_0/kernel"] == "model/Dense_0/kernel"
    assert stored["t/sp ace"].startswith("t/sp_ace--")
    assert stored["t/" + "ü" * 100] == "t/" + "u" * 40 + stored["t/" + "ü" * 100][-18:]
    assert stored["t/" + "x" * 300].startswith("t/" + "x" * 40 + "--")
    assert stored["t/W"].startswith("t/W--") and stored["t/w"].startswith("t/w--")
    assert stored["t/.."].startswith("t/k--") and stored["t/zarr.json"] != "t/zarr.json"
    # Deterministic: the same paths give the same names in every process and every save.
    assert storage_paths(reversed(list(stored))) == stored


@pytest.mark.parametrize("bad", ["a%20b", "a~b", "x" * 256, "zarr.json", "-x", "a b", "é"])
def test_readers_refuse_storage_names_no_writer_makes(bad):
    with pytest.raises(CorruptCheckpointError, match="storage path"):
        check_storage_path(f"t/{bad}", array="t")


def test_checkpoint_round_trips_every_key_within_name_limits(tmp_path):
    values = _tree()
    ckpt = Checkpoint(t=values)
    path = ckpt.save(str(tmp_path / "ckpt"))
    _assert_fits_file_systems(path)
    saved = dcheckpoint.read_metadata(path).arrays
    assert set(saved) == {"save_counter"} | {f"t/{escape(k)}" for k in KEYS}
    data_dir = saved["save_counter"].storage_path.split("/")[0]  # this save's data-<id>
    assert len(set(os.listdir(os.path.join(path, data_dir, "t")))) == len(KEYS) + 1  # zarr.json

    restored = _zeros()
    Checkpoint(t=restored).restore(path).assert_consumed()
    _assert_tree(restored)


def test_save_pytree_round_trips_every_key(tmp_path):
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), {"t": _tree(), "": {"": np.ones(1)}})
    _assert_fits_file_systems(path)
    out = dcheckpoint.restore_pytree(path, {"t": _zeros(), "": {"": np.zeros(1)}})
    _assert_tree(out["t"])
    np.testing.assert_array_equal(out[""][""], np.ones(1))
    _assert_tree(dcheckpoint.restore_pytree(path)["t"])  # no target: the user's keys


def test_checkpoint_is_read_by_restore_pytree_under_the_users_keys(tmp_path):
    path = Checkpoint(t={"sp ace": np.arange(3), "ünï": np.arange(4)}).save(str(tmp_path / "c"))
    target = {"t": {"sp ace": np.zeros(3, np.int64), "ünï": np.zeros(4, np.int64)}}
    out = dcheckpoint.restore_pytree(path, target)
    np.testing.assert_array_equal(out["t"]["sp ace"], np.arange(3))
    np.testing.assert_array_equal(out["t"]["ünï"], np.arange(4))
    as_saved = dcheckpoint.restore_pytree(path)
    assert set(as_saved) == {"t", "save_counter"} and set(as_saved["t"]) == {"sp ace", "ünï"}


def test_both_apis_name_the_same_tree_the_same_way(tmp_path):
    tree = {"t": {"sp ace": np.arange(2), "a/b": [np.arange(3)], "": np.arange(1)}}
    by_ckpt = Checkpoint(**tree).write(str(tmp_path / "c"))
    by_pytree = dcheckpoint.save_pytree(str(tmp_path / "p"), tree)
    ckpt_meta = dcheckpoint.read_metadata(by_ckpt).arrays
    pytree_meta = dcheckpoint.read_metadata(by_pytree).arrays
    assert set(ckpt_meta) == set(pytree_meta) == {"t/sp ace", "t/a%2Fb/0", "t/%00"}
    # The same names under each save's own data directory (data-<save id>/).
    assert {p: m.storage_path.split("/", 1)[1] for p, m in ckpt_meta.items()} == \
        {p: m.storage_path.split("/", 1)[1] for p, m in pytree_meta.items()}


def test_checkpoint_restores_a_save_pytree_checkpoint_by_the_same_names(tmp_path):
    tree = {"t": {"sp ace": np.arange(2), "a/b": [np.arange(3), np.arange(1)]}}
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), tree)
    target = {"sp ace": np.zeros(2, np.int64), "a/b": [np.zeros(3, np.int64),
                                                       np.zeros(1, np.int64)]}
    # save_pytree counts no saves: the counter is not an unmatched object.
    Checkpoint(t=target).restore(path).assert_consumed()
    np.testing.assert_array_equal(target["sp ace"], np.arange(2))
    np.testing.assert_array_equal(target["a/b"][0], np.arange(3))
    with pytest.raises(CheckpointMismatchError, match=r"'t/sp ace'.*shape \(3,\)"):
        Checkpoint(t={"sp ace": np.zeros(3, np.int64)}).restore(path)


def test_deferred_and_unmatched_names_are_the_users_keys(tmp_path):
    model = AutoTrackable()
    setattr(model, "a/b c", Variable(np.arange(3, dtype=np.float32)))
    path = Checkpoint(model=model).write(str(tmp_path / "c"))

    later = AutoTrackable()
    status = Checkpoint(model=later).read(path)  # "a/b c" does not exist yet
    setattr(later, "a/b c", Variable(np.zeros(3, np.float32)))  # restored now
    np.testing.assert_array_equal(getattr(later, "a/b c").numpy(), np.arange(3))
    status.assert_consumed()

    extra = AutoTrackable()
    setattr(extra, "a/b c", Variable(np.zeros(3, np.float32)))
    setattr(extra, "new/one", Variable(np.zeros(1, np.float32)))
    with pytest.raises(AssertionError, match="model/new%2Fone"):
        Checkpoint(model=extra).read(path).assert_existing_objects_matched()


def test_readers_use_the_recorded_storage_path_and_never_recompute_it(tmp_path):
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), {"sp ace": np.arange(5)})
    meta_file = os.path.join(path, "dcheckpoint.json")
    doc = json.load(open(meta_file))
    entry = doc["checkpoint"]["arrays"]["sp ace"]
    os.rename(os.path.join(path, entry["storage_path"]), os.path.join(path, "moved"))
    entry["storage_path"] = "moved"
    doc["sha256"] = _digest(doc["checkpoint"])
    json.dump(doc, open(meta_file, "w"))
    np.testing.assert_array_equal(dcheckpoint.restore_pytree(path)["sp ace"], np.arange(5))


def test_case_only_siblings_get_their_own_directories(tmp_path):
    tree = {"W": np.ones(2), "w": np.zeros(2), "Dense": {"b": np.ones(1)}, "dense": np.ones(3)}
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), tree)
    _assert_fits_file_systems(path)
    stored = {p: m.storage_path for p, m in dcheckpoint.read_metadata(path).arrays.items()}
    assert len({s.split("/")[1].casefold() for s in stored.values()}) == 4  # below data-<id>
    out = dcheckpoint.restore_pytree(path)
    np.testing.assert_array_equal(out["W"], np.ones(2))
    np.testing.assert_array_equal(out["w"], np.zeros(2))


def test_two_processes_agree_on_storage_names_and_reshard(tmp_path):
    """Every process derives the same storage names: chunks written by process 1 land
    where the coordinator's metadata says, and both read them onto a (2, 4) mesh."""
    out = results(run_launch(REPO_ROOT / "tests" / "workers" / "naming_worker.py",
                             tmp_path / "ckpt", processes=2, devices_per_process=4))
    path = str(tmp_path / "ckpt-1")
    assert [r["path"] for r in out] == [path, path]
    keys = ["sp ace", "a/b", "W", "w", "日本語の鍵" * 6, "ü" * 100, ""]
    for r in out:
        assert r["bad"] == [] and r["keys"] == sorted(keys)
    _assert_fits_file_systems(path)
    as_saved = dcheckpoint.restore_pytree(path)["t"]
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(
            as_saved[key], np.arange(32, dtype=np.float32).reshape(8, 4) + 100 * i)


def test_keys_whose_names_collide_are_refused_not_overwritten(tmp_path):
    with pytest.raises(ValueError, match=r"'t/1': two keys of one container have this name"):
        Checkpoint(t={1: np.ones(1), "1": np.zeros(1)}).write(str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
