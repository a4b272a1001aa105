"""The object graph: which values a checkpoint holds, under which readable paths.

Saving walks the user's objects from the checkpoint's top-level children and turns them
into ``{path: array}`` plus a JSON description of the graph (node kinds, child names,
aliases). Restoring walks the *current* objects the same way and matches them by path
(``restore_tree``): ``Variable``s are assigned in place, dicts and lists are updated in
place, immutable pytrees (NamedTuples, dataclasses, tuples, plain arrays) are rebuilt and
re-assigned on their parent. Values whose object does not exist yet are parked on the
parent ``AutoTrackable`` and restored when it is attached (deferred restoration).

Node kinds: ``variable`` and ``array`` are leaves (one saved array each); ``trackable``
(``AutoTrackable`` attributes), ``dict``, ``list`` (mutable, updated in place) and
``pytree`` (any other JAX pytree node, rebuilt) are containers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from dcheckpoint import _paths
from dcheckpoint._variable import Variable
from dcheckpoint.errors import CheckpointMismatchError, CorruptCheckpointError

__all__ = [
    "AutoTrackable",
    "GRAPH_FORMAT",
    "check_graph",
    "key_name",
    "LEAF_KINDS",
    "classify",
    "children",
    "escape",
    "flatten",
    "join",
    "leaf_paths",
    "pytree_children",
]

GRAPH_FORMAT = "dcheckpoint.object_graph.v1"
LEAF_KINDS = ("variable", "array")
CONTAINER_KINDS = ("trackable", "dict", "list", "pytree")
_INTERNAL_PREFIX = "_dc_"


class AutoTrackable:
    """Base class whose attributes become named edges of the checkpoint's object graph.

    Any attribute holding a ``Variable``, another ``AutoTrackable``, a dict, a list, a
    JAX/numpy array or any JAX pytree (optax states, registered dataclasses, flax-style
    nested dicts) is saved under ``<attribute name>/...``. Other attributes (ints,
    strings, callables) are ignored, as in TensorFlow.

    When a restore finds checkpoint values for an attribute that does not exist yet,
    they wait here and are restored the moment the attribute is assigned:

      >>> ckpt.restore(path)        # model.dense does not exist yet
      >>> model.dense = Dense(...)  # restored now, from the checkpoint
    """

    def __setattr__(self, name: str, value) -> None:
        pending = self.__dict__.get("_dc_pending")
        if pending and name in pending:
            value = pending.pop(name)(value)
        object.__setattr__(self, name, value)

    def _dc_defer(self, name: str, restore: Callable[[object], object]) -> None:
        """Parks ``restore`` until attribute ``name`` is assigned (internal)."""
        self.__dict__.setdefault("_dc_pending", {})[name] = restore


def classify(value) -> str | None:
    """Returns the node kind of ``value``, or ``None`` when it is not checkpointable."""
    if isinstance(value, Variable):
        return "variable"
    if isinstance(value, AutoTrackable):
        return "trackable"
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return "array"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list):
        return "list"
    if value is None or isinstance(value, str | bytes | int | float | complex):
        return None
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value)):
        return None
    return "pytree"


def escape(name) -> str:
    """One path component for the key ``name``: the naming rule of ``_paths.escape``."""
    return _paths.escape(name)


def join(parent: str, name: str) -> str:
    """Joins an (escaped) component onto a path; the root path is ``""``."""
    return f"{parent}/{name}" if parent else name


def key_name(key) -> str:
    """The readable name of one pytree key (dict key, attribute, index)."""
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def pytree_children(value):
    """One level of a pytree node: ``([(name, child)], treedef)`` to rebuild it."""
    keyed, treedef = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda x: x is not value)
    return [(key_name(path[0]), child) for path, child in keyed], treedef


def children(value, kind: str) -> list[tuple[str, object]]:
    """The named children of a container node, checkpointable or not, in a stable order."""
    if kind == "trackable":
        return [(k, v) for k, v in vars(value).items() if not k.startswith(_INTERNAL_PREFIX)]
    if kind == "dict":
        return [(str(k), v) for k, v in value.items()]
    if kind == "list":
        return [(str(i), v) for i, v in enumerate(value)]
    if kind == "pytree":
        return pytree_children(value)[0]
    return []


def _walk(top: list[tuple[str, object]]) -> Iterator[tuple[str, str, object, str | None]]:
    """Depth-first (path, kind, value, alias_of) over checkpointable nodes, shared once.

    The first path reaching an object owns it; later paths are reported as aliases and
    not descended, so a shared object is saved once and cycles terminate.
    """
    seen: dict[int, str] = {}
    keep = []  # flattening may make temporaries: keep them alive so ids stay unique
    stack = [(escape(name), value) for name, value in reversed(top)]
    while stack:
        path, value = stack.pop()
        kind = classify(value)
        if kind is None:
            continue
        if id(value) in seen:
            yield path, kind, value, seen[id(value)]
            continue
        seen[id(value)] = path
        keep.append(value)
        yield path, kind, value, None
        for name, child in reversed(children(value, kind)):
            stack.append((join(path, escape(name)), child))


def flatten(top: list[tuple[str, object]]) -> tuple[dict[str, object], dict]:
    """Turns the top-level children into saved arrays and the graph description.

    Args:
      top: ``[(name, value)]``, the checkpoint root's children.

    Returns:
      ``(arrays, graph)``: ``arrays`` maps each leaf's path to its ``jax.Array`` (or
      numpy value); ``graph`` is JSON with ``nodes`` ``{path: {"kind", "children"}}``
      (root ``""``) and ``aliases`` ``{path: path it shares its object with}``.
    """
    arrays: dict[str, object] = {}
    nodes: dict[str, dict] = {"": {"kind": "trackable", "children": []}}
    aliases: dict[str, str] = {}
    for path, kind, value, alias_of in _walk(top):
        if path in nodes or path in aliases:
            raise ValueError(f"{path!r}: two keys of one container have this name "
                             "(names are str(key): 1 and '1' collide); rename one")
        parent, _, name = path.rpartition("/")
        nodes[parent]["children"].append(name)
        if alias_of is not None:
            aliases[path] = alias_of
        elif kind in LEAF_KINDS:
            nodes[path] = {"kind": kind}
            arrays[path] = value.value if kind == "variable" else value
        else:
            nodes[path] = {"kind": kind, "children": []}
    return arrays, {"format": GRAPH_FORMAT, "nodes": nodes, "aliases": aliases}


def leaf_paths(value, path: str) -> list[str]:
    """Paths of the leaves (variables, arrays) reachable from ``value`` at ``path``."""
    parent, _, name = path.rpartition("/")
    top = [(_paths.unescape(name), value)]
    prefix = f"{parent}/" if parent else ""
    return [prefix + p for p, kind, _, alias in _walk(top) if kind in LEAF_KINDS and alias is None]


def check_graph(graph: object, *, source: str) -> tuple[dict, dict]:
    """Validates an object graph read from a checkpoint; returns (nodes, aliases).

    The metadata's checksum catches damage, not a crafted file: every field the restore
    walk indexes is checked here, so a bad graph is a ``CorruptCheckpointError`` naming
    the node, never a ``KeyError`` half-way through assigning values.
    """
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: object graph {what}")

    if isinstance(graph, dict) and graph.get("kind") == "pytree":
        raise CheckpointMismatchError(
            f"{source} was written by save_pytree, which records no object graph for "
            "Checkpoint to match; read it with dcheckpoint.restore_pytree(path, target), "
            "or restore_pytree(path) for the tree as saved"
        )
    if not isinstance(graph, dict) or graph.get("format") != GRAPH_FORMAT:
        raise bad(f"format is not {GRAPH_FORMAT!r} (not written by Checkpoint, or corrupt)")
    nodes, aliases = graph.get("nodes"), graph.get("aliases")
    if not isinstance(nodes, dict) or not isinstance(aliases, dict):
        raise bad("must hold 'nodes' and 'aliases' objects")
    for path, node in nodes.items():
        kind = node.get("kind") if isinstance(node, dict) else None
        if kind not in LEAF_KINDS + CONTAINER_KINDS:
            raise bad(f"node {path!r}: expected a kind in {LEAF_KINDS + CONTAINER_KINDS}, "
                      f"found {kind!r}")
        kids = node.get("children")
        if kind in CONTAINER_KINDS and not (
            isinstance(kids, list) and all(isinstance(k, str) for k in kids)
        ):
            raise bad(f"node {path!r}: 'children' must be a list of names, found {kids!r}")
    if nodes.get("", {}).get("kind") not in CONTAINER_KINDS:
        raise bad("has no root node")
    for path, target in aliases.items():
        if not isinstance(target, str) or target not in nodes:
            raise bad(f"alias {path!r} points to {target!r}, which is not a node")
    return nodes, aliases
