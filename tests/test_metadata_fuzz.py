"""Property-based fuzzing of the metadata reader: whatever the bytes, only
CorruptCheckpointError may escape (or a valid CheckpointMetadata comes back)."""

import copy
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcheckpoint._metadata import (
    ArrayMetadata,
    CheckpointMetadata,
    _digest,
    decode_metadata,
    encode_metadata,
)
from dcheckpoint.errors import CorruptCheckpointError

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
