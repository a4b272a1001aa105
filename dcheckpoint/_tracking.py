"""The object graph: which values a checkpoint holds, under which readable paths.

Saving walks the user's objects from the checkpoint's top-level children and turns them
into ``{path: array}`` plus a JSON description of the graph (node kinds, child names,
aliases). Restoring walks the *current* objects the same way and matches them by path
(``_checkpoint._Restorer``): ``Variable``s are assigned in place, dicts and lists are updated in
place, immutable pytrees (NamedTuples, dataclasses, tuples, plain arrays) are rebuilt and
re-assigned on their parent. Values whose object does not exist yet are parked on the
parent ``AutoTrackable`` and restored when it is attached (deferred restoration).

Node kinds (``classify``):

- leaves stored as one array each: ``variable`` (a ``Variable`` or flax ``nnx.Variable``,
  assigned in place) and ``array`` (jax/numpy arrays, typed PRNG keys, Python scalars
  and bytes, whose Python type the array's metadata records);
- leaves stored in the graph itself: ``value`` (a string or None, as JSON) and
  ``process_state`` (an object with ``get_state()``/``set_state()``, such as a grain
  data iterator: one state per process, see ``encode_state``);
- containers: ``trackable`` (``AutoTrackable`` attributes), ``object`` (a flax
  ``nnx.Module`` or other ``nnx.Pytree``: its data attributes), ``dict`` (any mutable
  mapping, ``nnx.State`` included) and ``list`` are mutable and updated in place;
  ``pytree`` (any other JAX pytree node) is rebuilt.

The rule for everything else: an attribute of an ``AutoTrackable`` that is not data (a
callable, a class, any other object) is skipped, as TensorFlow skips it; the same value
inside a dict, list, pytree or module's data is refused with a ``ValueError`` naming its
path, because there it is data the user expects back. Nothing is dropped silently.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Iterator, MutableMapping

import jax
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from dcheckpoint import _paths
from dcheckpoint._plan import ProcessValue, python_type
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
    "decode_state",
    "encode_state",
    "get_inner",
    "has_identity",
    "set_inner",
    "is_variable",
    "placeholder_paths",
    "replaced",
    "escape",
    "flatten",
    "join",
    "leaf_paths",
    "pytree_children",
]

GRAPH_FORMAT = "dcheckpoint.object_graph.v1"
ARRAY_KINDS = ("variable", "array")
LEAF_KINDS = ARRAY_KINDS + ("value", "process_state")
CONTAINER_KINDS = ("trackable", "object", "dict", "list", "pytree")
_INTERNAL_PREFIX = "_dc_"
_NNX_INTERNAL_PREFIX = "_pytree__"
_EMPTY = "empty"  # a pytree with no leaves (optax's EmptyState, ()): nothing to save


class AutoTrackable:
    """Base class whose attributes become named edges of the checkpoint's object graph.

    Any attribute holding a ``Variable``, another ``AutoTrackable``, a dict, a list, a
    JAX/numpy array, any JAX pytree (optax states, registered dataclasses, flax-style
    nested dicts), a flax ``nnx.Module``, a Python scalar, string, bytes or None, or an
    object with ``get_state()``/``set_state()`` is saved under ``<attribute name>/...``
    and restored. Callables and other objects are skipped, as in TensorFlow.

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


def _nnx():
    """flax.nnx if the program imported it; dcheckpoint does not import flax itself."""
    return sys.modules.get("flax.nnx")


def is_variable(value) -> bool:
    """Whether ``value`` holds one array: a ``Variable`` or a flax ``nnx.Variable``."""
    nnx = _nnx()
    return isinstance(value, Variable) or nnx is not None and isinstance(value, nnx.Variable)


def classify(value) -> str | None:
    """Returns the node kind of ``value``; ``"empty"`` for a pytree with no leaves
    (nothing to save), ``None`` when it cannot be checkpointed."""
    nnx = _nnx()
    if is_variable(value):
        return "variable"
    if isinstance(value, AutoTrackable):
        return "trackable"
    if nnx is not None and isinstance(value, nnx.Pytree):
        return "object"
    if isinstance(value, jax.Array | jax.ShapeDtypeStruct | np.ndarray | np.generic) or (
            python_type(value)):
        return "array"  # a ShapeDtypeStruct is a restore target (jax.eval_shape's output)
    if value is None or isinstance(value, str):
        return "value"
    if isinstance(value, dict | MutableMapping):
        return "dict"
    if isinstance(value, list):
        return "list"
    if callable(getattr(value, "get_state", None)) and callable(
        getattr(value, "set_state", None)
    ):
        return "process_state"
    treedef = jax.tree_util.tree_structure(value)
    if treedef.num_leaves == 0:
        return _EMPTY
    if jax.tree_util.treedef_is_leaf(treedef):
        return None
    return "pytree"


def has_identity(value) -> bool:
    """Whether two paths reaching ``value`` share one object (saved once, as an alias).

    Python scalars, strings, None and numpy scalars are values: CPython shares small
    ints and strings between unrelated places, which must not make them aliases.
    """
    return not (value is None or python_type(value) is not None
                or isinstance(value, str | np.generic))


def get_inner(variable):
    """The value a ``variable`` node holds (a ``Variable``'s or an ``nnx.Variable``'s)."""
    if isinstance(variable, Variable):
        return variable.value
    return variable.get_value()


def replaced(variable, value):
    """A new variable like ``variable`` holding ``value`` (for a pytree restore, which
    builds a new tree and leaves the target's objects as they were)."""
    if isinstance(variable, Variable):
        return Variable(value)
    return variable.replace(value)


def set_inner(variable, value):
    """Assigns a restored value into a ``variable`` node, in place; returns the node."""
    if isinstance(variable, Variable):
        return variable.assign(value)
    variable.set_value(value)
    return variable


def encode_state(path: str, state) -> dict:
    """The JSON form of one process's ``get_state()``: bytes as base64, else JSON.

    Raises:
      ValueError: the state is neither bytes nor JSON-serialisable (names ``path``).
    """
    if isinstance(state, bytes):
        return {"bytes": base64.b64encode(state).decode("ascii")}
    try:
        json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{path!r}: get_state() returned a {type(state).__name__} that is neither "
            f"bytes nor JSON ({e}); return bytes or plain JSON values"
        ) from None
    return {"json": state}


def decode_state(path: str, entry) -> object:
    """The state ``encode_state`` recorded, as ``set_state`` should receive it."""
    if isinstance(entry, dict) and isinstance(entry.get("bytes"), str) and len(entry) == 1:
        try:
            return base64.b64decode(entry["bytes"], validate=True)
        except ValueError:
            pass
    elif isinstance(entry, dict) and "json" in entry and len(entry) == 1:
        return entry["json"]
    raise CorruptCheckpointError(f"{path!r}: malformed per-process state {entry!r}")


def escape(name) -> str:
    """One path component for the key ``name``: ``str(name)`` with "%" and "/"
    percent-escaped, the empty name spelled "%00" (``_paths.escape``)."""
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
    if kind == "object":
        # An nnx module's data attributes, as its pytree flattening names them; its
        # static attributes (sizes, dtypes, callables) are part of its code, not state.
        return [(k, v) for k, v in pytree_children(value)[0]
                if not k.startswith(_NNX_INTERNAL_PREFIX)]
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

    Raises:
      ValueError: a value that cannot be saved sits inside a dict, list, pytree or
        module (an ``AutoTrackable``'s non-data attributes are skipped instead).
    """
    seen: dict[int, str] = {}
    keep = []  # flattening may make temporaries: keep them alive so ids stay unique
    stack = [(escape(name), value, False) for name, value in reversed(top)]
    while stack:
        path, value, strict = stack.pop()
        kind = classify(value)
        if kind == _EMPTY:
            continue
        if kind is None:
            if strict:
                raise CheckpointMismatchError(
                    f"{path!r}: a value of type {type(value).__name__} cannot be saved; it holds "
                    "arrays, Variables, Python scalars, strings, bytes, None, containers of "
                    "them and objects with get_state()/set_state(). Remove it from the "
                    "saved state, or keep it as an attribute of an AutoTrackable (skipped)"
                )
            continue
        if has_identity(value):
            if id(value) in seen:
                yield path, kind, value, seen[id(value)]
                continue
            seen[id(value)] = path
        keep.append(value)
        yield path, kind, value, None
        strict_children = kind != "trackable"
        for name, child in reversed(children(value, kind)):
            stack.append((join(path, escape(name)), child, strict_children))


def flatten(top: list[tuple[str, object]]) -> tuple[dict[str, object], dict]:
    """Turns the top-level children into saved arrays and the graph description.

    Args:
      top: ``[(name, value)]``, the checkpoint root's children.

    Returns:
      ``(arrays, graph)``: ``arrays`` maps each leaf's path to its ``jax.Array``, numpy
      or Python value, or a ``ProcessValue`` (this process's ``get_state()``); ``graph``
      is JSON with ``nodes`` ``{path: {"kind", "children"}}`` (root ``""``; ``value``
      nodes carry their ``"value"``) and ``aliases`` ``{path: path it shares its object
      with}``.
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
        elif kind in ARRAY_KINDS:
            nodes[path] = {"kind": kind}
            arrays[path] = get_inner(value) if kind == "variable" else value
        elif kind == "value":
            nodes[path] = {"kind": kind, "value": value}
        elif kind == "process_state":
            nodes[path] = {"kind": kind}
            arrays[path] = ProcessValue(encode_state(path, value.get_state()))
        else:
            nodes[path] = {"kind": kind, "children": []}
    return arrays, {"format": GRAPH_FORMAT, "nodes": nodes, "aliases": aliases}


def leaf_paths(value, path: str) -> list[str]:
    """Paths of the leaves (variables, arrays, values) reachable from ``value`` at ``path``."""
    parent, _, name = path.rpartition("/")
    top = [(_paths.unescape(name), value)]
    prefix = f"{parent}/" if parent else ""
    return [prefix + p for p, kind, _, alias in _walk(top) if kind in LEAF_KINDS and alias is None]


def placeholder_paths(value, path: str) -> list[str]:
    """Paths of the abstract leaves (``jax.ShapeDtypeStruct``s, bare or in a variable)
    reachable from ``value`` at ``path``: restore targets that must be filled."""
    parent, _, name = path.rpartition("/")
    prefix = f"{parent}/" if parent else ""
    return [prefix + p for p, kind, leaf, alias in _walk([(_paths.unescape(name), value)])
            if alias is None and kind in ARRAY_KINDS and isinstance(
                get_inner(leaf) if kind == "variable" else leaf, jax.ShapeDtypeStruct)]


def _pytree_nodes(graph: dict, bad) -> dict:
    """The object graph of a ``save_pytree`` checkpoint: its leaves are arrays, its
    recorded containers lists or dicts (dicts where none is recorded), so that a
    ``Checkpoint`` of the same state restores it by the same names."""
    leaves, kinds = graph.get("leaves"), graph.get("containers") or {}
    if not (isinstance(leaves, list) and all(isinstance(p, str) and p for p in leaves)
            and isinstance(kinds, dict)):
        raise bad("of save_pytree must hold 'leaves' (a list of paths) and 'containers'")
    nodes: dict[str, dict] = {"": {"kind": _list_or_dict(kinds, ""), "children": []}}
    for path in leaves:
        if path in nodes:
            raise bad(f"of save_pytree has {path!r} twice, or as an array and a container")
        parts = path.split("/")
        for i in range(1, len(parts)):  # the containers above the leaf, top down
            above, here = "/".join(parts[:i - 1]), "/".join(parts[:i])
            if here not in nodes:
                nodes[here] = {"kind": _list_or_dict(kinds, here), "children": []}
                nodes[above]["children"].append(parts[i - 1])
            elif "children" not in nodes[here]:
                raise bad(f"of save_pytree has {here!r} as an array and as a container")
        nodes["/".join(parts[:-1])]["children"].append(parts[-1])
        nodes[path] = {"kind": "array"}
    return nodes


def _list_or_dict(kinds: dict, path: str) -> str:
    return "list" if kinds.get(path) == "list" else "dict"


def check_graph(graph: object, *, source: str) -> tuple[dict, dict]:
    """Validates an object graph read from a checkpoint; returns (nodes, aliases).

    The metadata's checksum catches damage, not a crafted file: every field the restore
    walk indexes is checked here, so a bad graph is a ``CorruptCheckpointError`` naming
    the node, never a ``KeyError`` half-way through assigning values.
    """
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: object graph {what}")

    if isinstance(graph, dict) and graph.get("kind") == "pytree":
        return _pytree_nodes(graph, bad), {}
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
        if kind == "value" and "value" not in node:
            raise bad(f"node {path!r}: a value node must hold its 'value'")
        states = node.get("states")
        if kind == "process_state" and not isinstance(states, list):
            raise bad(f"node {path!r}: 'states' must be a list, found {states!r}")
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
