"""Issue 22: compact manifests, the coordinator's vectorised coverage check, and
steady-state saves that send a fingerprint instead of chunk lists, through the real
engine with simulated processes (`_threadcomm.ThreadJob`)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dcheckpoint import _engine, _manifest
from dcheckpoint._metadata import ArrayMetadata
from dcheckpoint._options import CheckpointOptions
from dcheckpoint._plan import SavePlan, plan_save
from dcheckpoint._threadcomm import ThreadJob
from dcheckpoint.errors import CheckpointError, CoordinationError


def _meta(shape, chunk):
    return ArrayMetadata(storage_path="x", shape=shape, dtype=np.dtype("float32"),
                         chunk_shape=chunk)


# -- encoding ---------------------------------------------------------------------------

def test_a_regular_sharding_is_one_group_of_ranges():
    # Process 1 of 4, 2 devices each, of 3 arrays sharded (8, 1) on dim 0: chunks 2..3.
    order = ["a", "b", "c"]
    chunks = {p: [(2, 0), (3, 0)] for p in order}
    groups, count = _manifest.encode_chunks(order, chunks)
    assert count == 6
    assert groups == [[[[0, 3]], ["r", [[2, 4, 1], [0, 1, 1]]]]]


def test_strided_and_block_sets_are_ranges_irregular_ones_lists():
    order = ["a", "b", "c", "s"]
    chunks = {"a": [(1, 0), (5, 0), (9, 0)],  # every 4th row chunk from 1: a stride
              "b": [(0, 2), (0, 3), (1, 2), (1, 3)],  # a 2 x 2 block
              "c": [(0, 0), (3, 0), (4, 0)],  # no progression: listed
              "s": [()]}  # a scalar's one chunk
    groups, count = _manifest.encode_chunks(order, chunks)
    assert count == 11
    assert groups == [
        [[[0, 1]], ["r", [[1, 10, 4], [0, 1, 1]]]],
        [[[1, 2]], ["r", [[0, 2, 1], [2, 4, 1]]]],
        [[[2, 3]], ["l", [[0, 0], [3, 0], [4, 0]]]],
        [[[3, 4]], ["r", []]],
    ]


def test_a_product_missing_one_corner_is_listed_not_ranged():
    groups, _ = _manifest.encode_chunks(["a"], {"a": [(0, 0), (0, 1), (1, 0)]})
    assert groups[0][1][0] == "l"


# -- coverage ---------------------------------------------------------------------------

ARRAYS = {"a": _meta((8, 4), (2, 4)), "b": _meta((8, 4), (2, 4)), "s": _meta((), ())}


def _manifests(assignment):
    """Full manifests of processes writing ``assignment[p] = {path: chunks}``."""
    out = []
    for chunks in assignment:
        groups, count = _manifest.encode_chunks(sorted(ARRAYS), chunks)
        out.append({"chunks": groups, "count": count})
    return out


GOOD = [{"a": [(0, 0), (1, 0)], "b": [(0, 0), (1, 0)], "s": [()]},
        {"a": [(2, 0), (3, 0)], "b": [(2, 0), (3, 0)]}]


def test_every_chunk_once_passes():
    _manifest.check_coverage(ARRAYS, _manifests(GOOD))


def test_a_missing_chunk_is_named():
    bad = [GOOD[0], {"a": [(2, 0)], "b": [(2, 0), (3, 0)]}]
    with pytest.raises(CheckpointError, match=(
            r"Array 'a': expected 4 chunks written once each; 1 missing \(first: \[\[3, 0\]\]\), "
            r"0 written more than once")):
        _manifest.check_coverage(ARRAYS, _manifests(bad))


def test_a_chunk_written_by_two_processes_is_named():
    bad = [GOOD[0], {"a": [(1, 0), (2, 0), (3, 0)], "b": [(2, 0), (3, 0)]}]
    with pytest.raises(CheckpointError, match=r"Array 'a': .* 1 written more than once "
                                              r"\(first: \[\[1, 0\]\]\)"):
        _manifest.check_coverage(ARRAYS, _manifests(bad))


def test_a_chunk_listed_twice_by_one_process_counts_twice():
    manifests = _manifests(GOOD)
    manifests[1]["chunks"].append([[[0, 1]], ["l", [[2, 0]]]])  # "a" in a second group
    with pytest.raises(CheckpointError, match="array 'a' is in more than one group"):
        _manifest.check_coverage(ARRAYS, manifests)
    manifests = _manifests(GOOD)
    manifests[1] = {"chunks": [[[[0, 1]], ["l", [[2, 0], [3, 0], [3, 0]]]],
                               [[[1, 2]], ["r", [[2, 4, 1], [0, 1, 1]]]]], "count": 5}
    with pytest.raises(CheckpointError, match=r"1 written more than once \(first: \[\[3, 0\]\]\)"):
        _manifest.check_coverage(ARRAYS, manifests)


def test_a_scalar_written_twice_is_caught():
    bad = [GOOD[0], {**GOOD[1], "s": [()]}]
    with pytest.raises(CheckpointError, match=r"Array 's': expected 1 chunks .* 1 written more"):
        _manifest.check_coverage(ARRAYS, _manifests(bad))


def test_a_chunk_outside_the_grid_is_refused():
    bad = [GOOD[0], {"a": [(2, 0), (3, 0), (4, 0)], "b": [(2, 0), (3, 0)]}]
    with pytest.raises(CheckpointError, match=(
            r"Process 1 sent a malformed manifest: array 'a': chunks 2..4 outside its grid")):
        _manifest.check_coverage(ARRAYS, _manifests(bad))
    bad = [GOOD[0], {"a": [(2, 0), (3, 0), (0, 7)], "b": [(2, 0), (3, 0)]}]
    with pytest.raises(CheckpointError, match=r"chunk \[0, 7\] outside its grid \(4, 1\)"):
        _manifest.check_coverage(ARRAYS, _manifests(bad))


@pytest.mark.parametrize(("crafted", "message"), [
    ({"chunks": "all of them", "count": 4}, "'chunks' must be a list of groups"),
    ({"chunks": [[[[0, 9]], ["r", [[0, 4, 1], [0, 1, 1]]]]], "count": 36},
     "array number 8 but the save has 3 arrays"),
    ({"chunks": [[[[0, 1]], ["r", [[0, 4, 0], [0, 1, 1]]]]], "count": 4},
     r"a range must be \[start, stop, step >= 1\]"),
    ({"chunks": [[[[0, 1]], ["r", [[0, 4, 1]]]]], "count": 4}, "ranges of rank 1"),
    ({"chunks": [[[[0, 1]], ["x", []]]], "count": 0}, "chunks must be"),
    ({"chunks": [[[[1, 0]], ["r", []]]], "count": 0}, r"array runs must be \[\[start, stop\)"),
    ({"chunks": [["AAAA", ["r", []]]], "count": 0}, "an array bitmap names no array"),
    ({"chunks": [[[[0, 1]], ["r", [[2, 4, 1], [0, 1, 1]]]]], "count": 9},
     "it claims 9 chunks but lists 2"),
])
def test_a_crafted_manifest_is_a_clean_error(crafted, message):
    manifests = [_manifests(GOOD)[0], crafted]
    with pytest.raises(CheckpointError, match=message):
        _manifest.check_coverage(ARRAYS, manifests)


def test_a_zero_size_array_has_no_chunks_to_write():
    arrays = {"z": ArrayMetadata("z", (0, 4), np.dtype("int8"), (1, 4))}
    _manifest.check_coverage(arrays, [{"chunks": [], "count": 0}])
    with pytest.raises(CheckpointError, match="outside its grid"):
        _manifest.check_coverage(arrays, [{"chunks": [[[[0, 1]], ["r", [[0, 1, 1], [0, 1, 1]]]]],
                                           "count": 1}])


# -- the engine with simulated processes -------------------------------------------------

PROCESSES = 4


def _state(scale=1.0):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("d", None))
    out = {f"layer{i}/w": jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4)
                                         * (i + 1) * scale, rows) for i in range(3)}
    out["step"] = np.int64(7)
    return out


def _plans(state, owner=lambda chunk: chunk[0] * PROCESSES // 8 if chunk else 0):
    """Each simulated process's plan: the chunks ``owner`` gives it (2 of the 8 each)."""
    whole = plan_save(state, is_coordinator=True)
    return [dataclasses.replace(whole, writes=tuple(
        w for w in whole.writes if owner(w.chunk) == p)) for p in range(PROCESSES)]


def _save(job, directory, plans, **kwargs):
    job.reset_counters()
    results = job.run(lambda comm: _engine.write_and_commit(
        directory, plans[comm.process_index], comm=comm,
        options=CheckpointOptions(timeout_secs=20), **kwargs))
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    assert results == [directory] * PROCESSES
    return dict(_engine.LAST_SAVE_PHASES[0]), job.gathered_bytes


def _restored(directory, state):
    out = _engine.restore_arrays(directory, {p: None for p in state})
    return {p: np.asarray(v).tolist() for p, v in out.items()}


def test_a_steady_save_sends_a_fingerprint_and_a_changed_plan_is_detected(tmp_path):
    job = ThreadJob(PROCESSES)
    state = _state()
    first, first_bytes = _save(job, str(tmp_path / "a"), _plans(state))
    assert (first["steady"], first["resent"]) == (False, False)
    state2 = _state(2.0)
    steady, steady_bytes = _save(job, str(tmp_path / "b"), _plans(state2))
    assert (steady["steady"], steady["resent"]) == (True, False)
    assert steady_bytes < first_bytes
    expected = {p: np.asarray(v).tolist() for p, v in state2.items()}
    assert _restored(str(tmp_path / "b"), state2) == expected
    # A new array: another fingerprint, so full manifests at once, no resend round.
    state3 = {**state2, "extra": np.ones(3, np.float32)}
    changed, _ = _save(job, str(tmp_path / "c"), _plans(state3))
    assert (changed["steady"], changed["resent"]) == (False, False)
    assert _restored(str(tmp_path / "c"), state3)["extra"] == [1.0, 1.0, 1.0]


def test_other_chunk_owners_under_the_same_plan_fall_back_to_full_manifests(tmp_path):
    job = ThreadJob(PROCESSES)
    state = _state()
    _save(job, str(tmp_path / "a"), _plans(state))
    # Same arrays, shapes and shardings, but the devices moved between processes: the
    # fingerprint matches, the digests do not, so everyone resends in the same save.
    swapped = _plans(state, owner=lambda c: (PROCESSES - 1 - c[0] * PROCESSES // 8) if c else 0)
    phases, _ = _save(job, str(tmp_path / "b"), swapped)
    assert (phases["steady"], phases["resent"]) == (False, True)
    expected = {p: np.asarray(v).tolist() for p, v in state.items()}
    assert _restored(str(tmp_path / "b"), state) == expected
    again, _ = _save(job, str(tmp_path / "c"), swapped)  # the new owners are cached now
    assert (again["steady"], again["resent"]) == (True, False)


@pytest.mark.parametrize("forgetful", [2, 0])
def test_a_process_without_a_cache_makes_everyone_resend(tmp_path, forgetful):
    job = ThreadJob(PROCESSES)
    state = _state()
    _save(job, str(tmp_path / "a"), _plans(state))
    _manifest.caches_for(job.communicators[forgetful])[0]._saved.clear()  # a restart
    phases, _ = _save(job, str(tmp_path / "b"), _plans(state))
    assert (phases["steady"], phases["resent"]) == (False, True)


def test_a_wrong_digest_is_never_trusted(tmp_path):
    job = ThreadJob(PROCESSES)
    state = _state()
    _save(job, str(tmp_path / "a"), _plans(state))
    # The coordinator's cache says process 3 wrote something else than it says now.
    coordinator = _manifest.caches_for(job.communicators[0])[1]
    (entries,) = coordinator._plans.values()
    entries[3]["digest"] = "0" * 32
    phases, _ = _save(job, str(tmp_path / "b"), _plans(state))
    assert (phases["steady"], phases["resent"]) == (False, True)


def test_a_missing_chunk_fails_the_save_on_every_process(tmp_path):
    job = ThreadJob(PROCESSES)
    state = _state()
    plans = _plans(state)
    plans[1] = dataclasses.replace(plans[1], writes=plans[1].writes[1:])
    results = job.run(lambda comm: _engine.write_and_commit(
        str(tmp_path / "a"), plans[comm.process_index], comm=comm,
        options=CheckpointOptions(timeout_secs=20)))
    messages = {str(r) for r in results}
    assert len(messages) == 1 and all(isinstance(r, CheckpointError) for r in results)
    assert "expected 8 chunks written once each; 1 missing" in messages.pop()
    assert not (tmp_path / "a").exists()


def test_a_hung_simulated_process_times_out_cleanly_everywhere(tmp_path):
    job = ThreadJob(3)
    plan = SavePlan(arrays={}, writes=())

    def run(comm):
        if comm.process_index == 2:
            return "hung"  # never joins the save
        return _engine.write_and_commit(str(tmp_path / "a"), plan, comm=comm,
                                        options=CheckpointOptions(timeout_secs=1))

    results = job.run(run)
    assert results[2] == "hung"
    assert isinstance(results[0], CoordinationError)
    assert "waiting for save identity" in str(results[0]) and "[2]" in str(results[0])
    assert isinstance(results[1], CoordinationError)


def test_manifests_are_json():
    groups, _ = _manifest.encode_chunks(["a"], {"a": [(0, 1), (5, 3)]})
    assert json.loads(json.dumps(groups)) == groups


def test_interleaved_arrays_are_a_bitmap_and_check_like_runs():
    # Every layer's weight between its other arrays: 50 runs, shorter as a bitmap.
    order = [f"{i:03d}" for i in range(100)]
    arrays = {p: _meta((8, 4), (2, 4)) for p in order}
    halves = [{p: [(0, 0), (1, 0)] if i % 2 else [(2, 0), (3, 0)] for i, p in enumerate(order)},
              {p: [(2, 0), (3, 0)] if i % 2 else [(0, 0), (1, 0)] for i, p in enumerate(order)}]
    manifests = []
    for chunks in halves:
        groups, count = _manifest.encode_chunks(order, chunks)
        assert all(isinstance(arrays_of, str) for arrays_of, _ in groups)
        manifests.append({"chunks": groups, "count": count})
    _manifest.check_coverage(arrays, manifests)
    with pytest.raises(CheckpointError, match=r"Array '000': expected 4 chunks .* 2 missing"):
        _manifest.check_coverage(arrays, manifests[:1])
