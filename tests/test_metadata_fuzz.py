"""Property-based fuzzing of the metadata reader: whatever the bytes, only
CorruptCheckpointError may escape (or a valid CheckpointMetadata comes back); and of
whole crafted checkpoints (shapes, chunk shapes, file types): only a CheckpointError,
never an abort, a MemoryError or a hang."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dcheckpoint._metadata import (
    ArrayMetadata,
    CheckpointMetadata,
    _digest,
    decode_metadata,
    encode_metadata,
)
from dcheckpoint.errors import CorruptCheckpointError
from tests.mp_util import REPO_ROOT

VALID = json.loads(encode_metadata(CheckpointMetadata(
    arrays={
        "model/w": ArrayMetadata("model/w", (16, 4), np.dtype("float32"), (2, 4),
                                 {"sharding_specs": ["x", None]}),
        "step": ArrayMetadata("step", (), np.dtype("int32"), ()),
    },
    object_graph={"kind": "pytree", "leaves": ["model/w", "step"]},
    save_time=1.5,
    writer={"process_count": 1},
)))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=5),
    max_leaves=30,
)
FIELDS = ["storage_path", "shape", "dtype", "chunk_shape", "layout"]


def _decode(data: bytes):
    try:
        return decode_metadata(data, source="fuzz/dcheckpoint.json")
    except CorruptCheckpointError as e:
        assert "fuzz/dcheckpoint.json" in str(e) or "Array " in str(e)
        return None


def _paths_into(doc):
    """Every (container, key) inside ``doc`` that a mutation may replace."""
    found = []
    stack = [doc]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            found.append((node, key))
            if isinstance(value, (dict, list)):
                stack.append(value)
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes(data):
    _decode(data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json(value):
    _decode(json.dumps(value).encode())
    # ... and the same value placed where the reader looks, correctly signed.
    doc = copy.deepcopy(VALID)
    doc["checkpoint"] = value
    doc["sha256"] = _digest(value)
    _decode(json.dumps(doc).encode())


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutated_valid_documents(data):
    doc = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        spots = _paths_into(doc)
        container, key = spots[data.draw(st.integers(0, len(spots) - 1))]
        action = data.draw(st.sampled_from(["replace", "delete", "field"]))
        if action == "delete" and isinstance(container, dict):
            del container[key]
        elif action == "field":
            entry = doc["checkpoint"]["arrays"].get("model/w") if isinstance(
                doc.get("checkpoint"), dict) and isinstance(
                doc["checkpoint"].get("arrays"), dict) else None
            if isinstance(entry, dict):
                entry[data.draw(st.sampled_from(FIELDS))] = data.draw(json_values)
        else:
            container[key] = data.draw(json_values)
    if data.draw(st.booleans()) and isinstance(doc, dict) and "checkpoint" in doc:
        doc["sha256"] = _digest(doc["checkpoint"])  # get past the checksum, reach fields
    result = _decode(json.dumps(doc).encode())
    if result is not None:
        for meta in result.arrays.values():
            assert isinstance(meta.storage_path, str) and ".." not in meta.storage_path.split("/")
            assert len(meta.shape) == len(meta.chunk_shape)


def test_the_valid_document_decodes():
    meta = _decode(json.dumps(VALID).encode())
    assert meta.arrays["model/w"].shape == (16, 4)
    assert meta.arrays["step"].dtype == np.dtype("int32")


def test_deeply_nested_json_is_refused_not_crashed():
    _decode(b"[" * 100_000 + b"]" * 100_000)
    deep = "[" * 5000 + "]" * 5000
    assert _decode(f'{{"format": "dcheckpoint", "format_version": 2, "checkpoint": {deep}}}'
                   .encode()) is None


# -- Crafted checkpoints on disk: shapes, chunk shapes and file types -------------------
#
# A crafted shape can make a C++ allocation fail, which aborts the process (no Python
# exception), and a FIFO blocks its reader forever. So the restores run in a child
# process, a batch of cases each: an abort is a non-zero exit and a hang a timeout, and
# either fails the test with the batch printed.

CRAFTED_WORKER = textwrap.dedent("""
    import json, os, socket, sys, traceback
    import numpy as np
    from dcheckpoint import read_metadata, restore_pytree, verify
    from dcheckpoint._engine import save_arrays
    from dcheckpoint._metadata import _digest
    from dcheckpoint.errors import CheckpointError

    root, cases = sys.argv[1], json.load(open(sys.argv[2]))
    outside = os.path.join(root, "outside")
    os.makedirs(outside)
    outcomes = []
    for i, case in enumerate(cases):
        path = save_arrays(os.path.join(root, f"ckpt-{i}"),
                           {"a": np.arange(12, dtype=np.int32).reshape(3, 4)})
        meta_path = os.path.join(path, "dcheckpoint.json")
        doc = json.load(open(meta_path))
        entry = doc["checkpoint"]["arrays"]["a"]
        array = os.path.join(path, entry["storage_path"])  # data-<save id>/a
        entry.update(shape=case["shape"], chunk_shape=case["chunk"], dtype=case["dtype"])
        doc["sha256"] = _digest(doc["checkpoint"])
        json.dump(doc, open(meta_path, "w"))
        zarr_path = os.path.join(array, "zarr.json")
        if case["zarr_agrees"]:
            z = json.load(open(zarr_path))
            z.update(shape=case["shape"], data_type=case["dtype"])
            z["chunk_grid"]["configuration"]["chunk_shape"] = case["chunk"]
            json.dump(z, open(zarr_path, "w"))
        victim = {"metadata": meta_path, "zarr.json": zarr_path,
                  "chunk": next(os.path.join(d, f) for d, _, fs in
                                os.walk(os.path.join(array, "c")) for f in fs),
                  "array": array}[case["where"]]
        kind = case["file"]
        if kind is not None:
            if os.path.isdir(victim):
                os.rename(victim, victim + ".moved")
            elif os.path.exists(victim):
                os.remove(victim)
            if kind == "fifo":
                os.mkfifo(victim)
            elif kind == "directory":
                os.mkdir(victim)
            elif kind == "symlink":
                os.symlink(outside, victim)
            elif kind == "socket":
                s = socket.socket(socket.AF_UNIX)
                s.bind(victim)
            else:
                open(victim, "wb").write(b"" if kind == "empty" else b"\\xff" * 7)
        outcome = {}
        for name, call in [("read_metadata", lambda: read_metadata(path)),
                           ("restore", lambda: restore_pytree(path, {"a": None})),
                           ("verify", lambda: verify(path).ok)]:
            try:
                result = call()
                outcome[name] = "ok" if name != "verify" else f"report ok={result}"
            except CheckpointError as e:
                outcome[name] = type(e).__name__
            except Exception:
                outcome[name] = "UNEXPECTED " + traceback.format_exc()
        outcomes.append(outcome)
    print("OUTCOMES", json.dumps(outcomes), flush=True)
""")

_dims = st.one_of(st.integers(0, 8), st.sampled_from([2**20, 2**31, 10**12, 2**61]))
_chunk_dims = st.one_of(st.integers(1, 8), st.sampled_from([2**20, 2**31, 10**12]))


@st.composite
def _crafted_case(draw):
    shape = draw(st.lists(_dims, min_size=0, max_size=3))
    same_rank = draw(st.booleans()) or draw(st.booleans())
    chunk = (draw(st.lists(_chunk_dims, min_size=len(shape), max_size=len(shape)))
             if same_rank else draw(st.lists(_chunk_dims, max_size=3)))
    return {
        "shape": shape,
        "chunk": chunk,
        "dtype": draw(st.sampled_from(["int32", "float64", "uint8", "bfloat16"])),
        "zarr_agrees": draw(st.booleans()) or draw(st.booleans()),
        "where": draw(st.sampled_from(["metadata", "zarr.json", "chunk", "array"])),
        "file": draw(st.sampled_from(
            [None, None, "fifo", "directory", "symlink", "socket", "empty", "garbage"])),
    }


# No shrinking: each example is a whole child process; the failing batch is printed.
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(st.lists(_crafted_case(), min_size=20, max_size=20))
def test_crafted_shapes_and_file_types_never_abort_or_hang_a_reader(tmp_path_factory, cases):
    root = tmp_path_factory.mktemp("crafted")
    (root / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    try:
        completed = subprocess.run(
            [sys.executable, "-c", CRAFTED_WORKER, str(root / "work"), str(root / "cases.json")],
            env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a reader hung on one of these crafted checkpoints: {cases}")
    assert completed.returncode == 0, (
        f"exit {completed.returncode} (an abort?) on {cases}\n{completed.stderr[-3000:]}")
    line = next(x for x in completed.stdout.splitlines() if x.startswith("OUTCOMES"))
    outcomes = json.loads(line.split(" ", 1)[1])
    assert len(outcomes) == len(cases)
    for case, outcome in zip(cases, outcomes, strict=True):
        assert not any(v.startswith("UNEXPECTED") for v in outcome.values()), (case, outcome)
        assert outcome["verify"].startswith("report"), (case, outcome)  # verify never raises
