"""The functional API for JAX users who want no object graph: save a pytree, restore it
onto a target pytree of shardings, or get it back as saved.

Array names follow the one rule of ``_paths``: a leaf's key path, each key escaped,
joined with ``/`` (``params/dense/kernel``); a tree that is one leaf is named ``value``.
``Checkpoint(t={...})`` names the same values the same way, so either API reads what
the other wrote under the user's own keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.tree_util import SequenceKey

from mesh import Mesh

from ._engine import read_metadata, restore_arrays, save_arrays, save_failed_here
from ._gc import paused as _gc_paused
from ._log import log_restore
from ._metadata import ArrayMetadata, CheckpointMetadata
from ._options import CheckpointOptions
from ._paths import join_path, unescape
from ._plan import is_numeric, key_struct
from ._tracking import (
    CONTAINER_KINDS,
    GRAPH_FORMAT,
    check_graph,
    decode_state,
    get_inner,
    is_variable,
    key_name,
    replaced,
)
from .errors import CheckpointMismatchError, CorruptCheckpointError

__all__ = ["save_pytree", "restore_pytree", "target_from_metadata"]

_LEAF_ROOT = "value"  # the name of a tree that is a single leaf
_MAX_ALIAS_HOPS = 64
_SAVABLE = ("jax.Array, numpy array or scalar, Python bool/int/float/complex, Variable "
            "or flax nnx.Variable")


def _is_leaf(x: Any) -> bool:
    """None, and a variable: a holder of one array is named by its own path (the
    object API's rule), not by its pytree children (``kernel/value`` of nnx)."""
    return x is None or is_variable(x)


def _flatten(tree: Any) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    named = {}
    for keys, leaf in leaves:
        name = join_path(key_name(k) for k in keys) or _LEAF_ROOT
        if name in named:
            raise ValueError(f"{name!r}: two keys of one container have this name "
                             "(names are str(key): 1 and '1' collide); rename one")
        named[name] = leaf
    return named, treedef


def _container_kinds(tree: Any) -> dict[str, str]:
    """``{path: "list" | "dict"}`` of every container holding a leaf, root ``""``.

    Sequences (lists, tuples) are lists; every other node (dicts, dataclasses,
    NamedTuples, custom nodes) is a dict by child name. A tree that is one leaf has none.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return {}
    kinds = {"": "list" if isinstance(tree, list | tuple) else "dict"}
    for keys, _ in leaves:
        for i, key in enumerate(keys):
            kinds[join_path(key_name(k) for k in keys[:i])] = (
                "list" if isinstance(key, SequenceKey) else "dict"
            )
    return kinds


def _savable(path: str, leaf: Any) -> Any:
    """The value saved for ``leaf``; an unsupported leaf is an error naming it."""
    if is_variable(leaf):
        return get_inner(leaf)
    if isinstance(leaf, jax.Array | np.ndarray | np.generic | bool | int | float | complex):
        return leaf
    raise CheckpointMismatchError(
        f"save_pytree: leaf {path!r} has type {type(leaf).__module__}."
        f"{type(leaf).__qualname__}, which cannot be saved; supported leaves: {_SAVABLE}. "
        "Register its class as a "
        "pytree node (jax.tree_util.register_dataclass) or convert it to an array"
    )


@_gc_paused
def save_pytree(
    path: str, tree: Any, *, options: CheckpointOptions | None = None
) -> str:
    """Saves every array leaf of ``tree`` as one checkpoint at ``path``, synchronously.

    Leaves are jax.Arrays (any sharding), numpy arrays, Python scalars, Variables or
    flax ``nnx.Variable``s; their key paths ("params/dense/kernel", keys escaped as
    docs/FORMAT.md says; a variable by its own path) become the array paths.
    Collective under multi-process. For async saves use :class:`PytreeManager`.

    Returns:
      ``path``.

    Raises:
      ValueError: a leaf is None or of an unsupported type (a CheckpointMismatchError
        naming it and what is supported), or ``options.enable_async`` is set.
    """
    try:
        if options is not None and options.enable_async:
            raise ValueError(
                f"save_pytree({path!r}) saves synchronously and has no sync() to wait on; "
                "for an async save use dcheckpoint.PytreeManager(directory).save(step, "
                "tree, options=CheckpointOptions(enable_async=True)), then its sync()"
            )
        named, graph = pytree_arrays(tree)
    except Exception as e:  # the other processes are (or will be) in the save: tell them
        save_failed_here(path, e, options=options)
    return save_arrays(path, named, object_graph=graph, options=options)


def pytree_arrays(tree: Any) -> tuple[dict[str, Any], dict]:
    """``({array path: value}, object graph)`` of ``tree`` as ``save_pytree`` stores it.

    Raises:
      ValueError: a leaf is None or cannot be saved (naming it).
    """
    named, _ = _flatten(tree)
    none_leaves = [k for k, v in named.items() if v is None]
    if none_leaves:
        raise ValueError(f"save_pytree: leaves {none_leaves[:5]} are None; nothing to save")
    named = {k: _savable(k, v) for k, v in named.items()}
    return named, {"kind": "pytree", "leaves": sorted(named),
                   "containers": _container_kinds(tree)}


@_gc_paused
def restore_pytree(path: str, target: Any = None, *, cast_dtypes: bool = False,
                   source: Any = None) -> Any:
    """Restores the checkpoint at ``path`` into the structure of ``target``.

    Args:
      target: a pytree whose leaves say where each array goes: a jax.Array or
        ``jax.ShapeDtypeStruct`` (``jax.eval_shape``'s output; typed PRNG keys too)
        with a sharding (restored onto that sharding, shape and dtype checked; one on
        an abstract mesh takes the mesh of ``jax.set_mesh``), a ``ShapeDtypeStruct``
        without one (an uncommitted jax.Array on the default device), a ``Sharding``,
        a numpy array or None (host numpy), a ``Variable`` or ``nnx.Variable`` holding
        any of these (a new variable holds the result). With no target at all, the
        whole checkpoint comes back as saved (see below).
      cast_dtypes: a target leaf of another numeric dtype than the saved array (a
        bfloat16 checkpoint into a float32 eval model) gets the saved values cast to
        its dtype, on its devices, instead of a CheckpointMismatchError. Off by default:
        a dtype difference is usually a wrong target. Shapes must still match.
    Returns:
      a pytree of the same structure holding the restored arrays. Without a target:
      host numpy arrays nested as saved, by key name: lists and tuples as lists, every
      other container (dicts, dataclasses, NamedTuples, custom pytree nodes, and a
      ``Checkpoint``'s objects) as a dict; a ``Checkpoint``'s ``save_counter`` is
      included, and an object it saved under several paths is at each of them (one
      that contains itself is left out there, so the result is a tree).
      ``target_from_metadata`` builds a target of the same shape. A target leaf whose
      path runs through such a shared object reads the array saved at its first path.
      source: (private) where the arrays come from instead of ``path``: an object with
        ``metadata`` and ``read(targets)`` (the local tier's `LocalRestore`); its
        reads are collective, so every process restores the same tree.
    Raises:
      CheckpointMismatchError: the checkpoint lacks a leaf of ``target``, disagrees on
        a shape or dtype, or a target sharding does not divide the saved shape.
    """
    started = time.perf_counter()
    if source is None:
        metadata = read_metadata(path)

        def read(targets):
            return restore_arrays(path, targets, metadata=metadata)
    else:
        metadata, read = source.metadata, source.read
    if target is None:
        values = read(dict.fromkeys(metadata.arrays))
        log_restore(path, sum(m.nbytes for m in metadata.arrays.values()),
                    time.perf_counter() - started)
        return _as_saved(metadata, values, source=str(path))
    named, treedef = _flatten(target)
    holders = {name: leaf for name, leaf in named.items() if is_variable(leaf)}
    named = {name: get_inner(leaf) if name in holders else leaf
             for name, leaf in named.items()}
    aliases = {}
    if any(name not in metadata.arrays for name in named):
        aliases = _structure(metadata, str(path))[2]
    saved = {name: _saved_name(name, name in holders, aliases, metadata) for name in named}
    missing = sorted(name for name, s in saved.items() if s not in metadata.arrays)
    if missing:
        raise CheckpointMismatchError(
            f"Checkpoint {path!r} has no arrays {missing[:5]} that the restore target "
            f"expects; it holds {sorted(metadata.arrays)[:10]}"
        )
    casts = {}
    if cast_dtypes:
        for name, leaf in named.items():
            leaf, casts[name] = _saved_dtype_target(name, leaf, metadata.arrays[saved[name]])
            named[name] = leaf
    for name, leaf in named.items():
        _check_divides(name, leaf, metadata.arrays[saved[name]])
    # One read per saved array; a second target leaf on the same array (a shared object
    # saved once) reuses it when it asks for the same placement.
    first: dict[str, str] = {}
    for name in named:
        first.setdefault(saved[name], name)
    values = read({s: named[n] for s, n in first.items()})
    leaves = []
    for name, leaf in named.items():
        if leaf is named[first[saved[name]]]:
            leaves.append(values[saved[name]])
        else:
            leaves.append(read({saved[name]: leaf})[saved[name]])
    log_restore(path, sum(metadata.arrays[s].nbytes for s in first),
                time.perf_counter() - started)
    leaves = [leaf if casts.get(name) is None else leaf.astype(casts[name])
              for name, leaf in zip(named, leaves, strict=True)]
    leaves = [replaced(holders[name], leaf) if name in holders else leaf
              for name, leaf in zip(named, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _saved_dtype_target(name: str, target: Any, meta: ArrayMetadata) -> tuple[Any, Any]:
    """(a target that reads ``meta``'s dtype, the dtype to cast to or None).

    The saved dtype is read (fewer bytes when the checkpoint is the narrower one) and
    cast where the target puts it: on its devices for a jax target, on the host for a
    numpy one. Only numeric to numeric; typed PRNG keys and packed scalars never cast.
    """
    dtype = getattr(target, "dtype", None)
    if (dtype is None or isinstance(target, jax.sharding.Sharding) or meta.key_impl is not None
            or meta.python_type is not None or np.dtype(dtype) == meta.dtype):
        return target, None
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return target, None  # plan_read names the key mismatch
    if not (is_numeric(dtype) and is_numeric(meta.dtype)):
        raise CheckpointMismatchError(
            f"Array {name!r}: cast_dtypes casts numbers only; the target has dtype "
            f"{np.dtype(dtype).name}, the checkpoint holds {meta.dtype.name}")
    if isinstance(target, jax.Array | jax.ShapeDtypeStruct):
        sharding = target.sharding
        return jax.ShapeDtypeStruct(target.shape, meta.dtype, sharding=sharding), dtype
    return np.broadcast_to(np.zeros((), meta.dtype), np.shape(target)), dtype  # no memory


def _saved_name(name: str, is_holder: bool, aliases: dict, metadata) -> str:
    """Where the checkpoint holds the array of target leaf ``name``.

    Earlier versions of ``save_pytree`` named an nnx Variable by its pytree child,
    ``kernel/value``; those checkpoints still restore into a target of variables.
    """
    saved = _resolve(name, aliases)
    legacy = f"{saved}/value"
    if is_holder and saved not in metadata.arrays and legacy in metadata.arrays:
        return legacy
    return saved


def _check_divides(path: str, target: Any, meta: ArrayMetadata) -> None:
    """A target sharding must cut the saved shape evenly (JAX arrays cannot be ragged)."""
    if isinstance(target, jax.sharding.Sharding):
        sharding = target
    elif isinstance(target, jax.ShapeDtypeStruct) and tuple(target.shape) == meta.shape:
        sharding = target.sharding
    else:
        return  # no sharding, or a shape mismatch that restore_arrays reports
    if not isinstance(sharding, jax.sharding.Sharding):
        return
    try:
        sharding.shard_shape(meta.shape)
    except ValueError as e:
        detail = str(e).split(" implies that ", 1)[-1]  # JAX's message repeats the sharding
        raise CheckpointMismatchError(
            f"Array {path!r}: the target sharding {sharding} does not divide the saved "
            f"shape {meta.shape}: {detail}. Choose a sharding whose axis sizes divide each "
            "dimension, or leave that dimension unsharded"
        ) from None


def target_from_metadata(
    checkpoint: str | CheckpointMetadata,
    sharding: jax.sharding.Sharding | Mesh | jax.sharding.Mesh | Callable | None = None,
) -> Any:
    """A restore target of ``jax.ShapeDtypeStruct``s for every array of a checkpoint.

    The tree has the structure ``restore_pytree(path)`` returns; pass it, edited or not,
    to ``restore_pytree(path, target)`` to read each array straight onto its sharding.

    Args:
      checkpoint: a checkpoint path, or its ``read_metadata`` result.
      sharding: where each array goes.
        - None: no sharding (``restore_pytree`` gives uncommitted jax.Arrays on the
          default device, as for any ``ShapeDtypeStruct`` without a sharding);
        - a ``jax.sharding.Sharding``: every array on it (e.g. replicated);
        - a ``mesh.Mesh`` or ``jax.sharding.Mesh``: each array split over the axes it
          was saved on, by axis name; a dimension whose axes the mesh lacks, or whose
          size they do not divide, is unsharded;
        - a callable ``(path, ArrayMetadata) -> Sharding or None``.
    Returns:
      nested dicts/lists of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``.
    Raises:
      CheckpointNotFoundError: no checkpoint at ``checkpoint``.
      TypeError: ``sharding`` is none of the above, or a callable returned another type.
    """
    metadata = checkpoint if isinstance(checkpoint, CheckpointMetadata) else read_metadata(
        checkpoint)
    rule = _sharding_rule(sharding)
    leaves = {}
    for path, meta in metadata.arrays.items():
        chosen = rule(path, meta)
        if chosen is not None and not isinstance(chosen, jax.sharding.Sharding):
            raise TypeError(
                f"Array {path!r}: the sharding rule returned a {type(chosen).__name__}, "
                "expected a jax.sharding.Sharding or None"
            )
        if meta.key_impl is not None:
            leaves[path] = key_struct(meta, meta.key_impl, _key_sharding(chosen, meta))
        else:
            leaves[path] = jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=chosen)
    return _as_saved(metadata, leaves, source=str(checkpoint))


def _key_sharding(sharding, meta: ArrayMetadata):
    """A sharding chosen for a key array's stored data, for the keys themselves: the
    trailing key-data dimension is never sharded, so a spec over it is dropped."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        rank = len(meta.shape) - 1  # the key data has one more dimension than the keys
        spec = tuple(sharding.spec)[:rank]
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding


def _sharding_rule(sharding) -> Callable[[str, ArrayMetadata], Any]:
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return lambda path, meta: sharding
    if isinstance(sharding, Mesh | jax.sharding.Mesh):
        jax_mesh = sharding.jax_mesh if isinstance(sharding, Mesh) else sharding
        return lambda path, meta: _as_saved_on(jax_mesh, meta)
    if callable(sharding):
        return sharding
    raise TypeError(
        "target_from_metadata: sharding must be None, a jax.sharding.Sharding, a Mesh or "
        f"a callable (path, ArrayMetadata) -> Sharding; found {type(sharding).__name__}"
    )


def _as_saved_on(jax_mesh: jax.sharding.Mesh, meta: ArrayMetadata):
    """The saved layout's axis names on ``jax_mesh``, where they divide the shape."""
    specs = (meta.layout or {}).get("sharding_specs")
    if not isinstance(specs, list) or len(specs) != len(meta.shape):
        specs = [None] * len(meta.shape)
    sizes = dict(jax_mesh.shape)
    partition, used = [], set()
    for dim, entry in zip(meta.shape, specs, strict=True):
        names = tuple(entry) if isinstance(entry, list) else (entry,)
        fits = all(isinstance(n, str) and n in sizes and n not in used for n in names)
        if fits and dim % int(np.prod([sizes[n] for n in names])) == 0:
            partition.append(names if len(names) > 1 else names[0])
            used.update(names)
        else:
            partition.append(None)
    return jax.sharding.NamedSharding(jax_mesh, jax.sharding.PartitionSpec(*partition))


def _as_saved(metadata: CheckpointMetadata, values: dict[str, Any], *, source: str) -> Any:
    """Nests ``values`` (one per saved array path) as the checkpoint's writer saved them.

    The structure comes from the object graph: a ``Checkpoint``'s nodes (lists stay
    lists, every other container is a dict) or ``save_pytree``'s container kinds; other
    checkpoints nest by path, in dicts. An object a ``Checkpoint`` saved under several
    paths is one object at each of them, except where it would contain itself (a
    cycle): the result is always a tree that ``jax.tree`` functions can walk.
    """
    children, kinds, aliases = _structure(metadata, source)
    values = {**_graph_values(metadata, source), **values}
    if "" not in kinds:  # save_pytree of a single leaf
        return values[_LEAF_ROOT]
    built: dict[str, Any] = {}
    active: set[str] = set()  # containers being built: an alias to one is a cycle
    skip = object()

    def build(path: str) -> Any:
        path = aliases.get(path, path)  # check_graph: an alias names a node, not an alias
        if path in active:
            return skip
        if path in built:
            return built[path]
        if path not in kinds:
            if path not in values:
                raise CorruptCheckpointError(
                    f"{source}: {path!r} is in the object graph but no array is stored for it"
                )
            return values[path]
        active.add(path)
        items = {}
        for name in children.get(path, ()):
            value = build(f"{path}/{name}" if path else name)
            if value is not skip:
                items[name] = value
        active.discard(path)
        indices = [int(n) for n in items if n.isascii() and n.isdigit()]
        # A list from a crafted file must not allocate more than its names justify.
        if kinds[path] == "list" and len(indices) == len(items) and max(
                indices, default=0) < 2 * len(items) + 16:
            out: Any = [None] * (max(indices, default=-1) + 1)
            for index, value in zip(indices, items.values(), strict=True):
                out[index] = value
        else:
            out = {unescape(name): value for name, value in items.items()}
        built[path] = out
        return out

    try:
        return build("")
    except RecursionError:
        raise CorruptCheckpointError(f"{source}: the object graph nests too deeply") from None


def _graph_values(metadata: CheckpointMetadata, source: str) -> dict[str, Any]:
    """The values a ``Checkpoint`` kept in its object graph rather than in arrays: a
    ``value`` node's JSON, and a ``process_state`` node's saved states, one per process
    in process order (a restore without a target gives back what was saved)."""
    graph = metadata.object_graph
    if not (isinstance(graph, dict) and graph.get("format") == GRAPH_FORMAT):
        return {}
    nodes, _ = check_graph(graph, source=source)
    found = {}
    for path, node in nodes.items():
        if node["kind"] == "value":
            found[path] = node["value"]
        elif node["kind"] == "process_state":
            found[path] = [decode_state(path, state) for state in node["states"]]
    return found


def _resolve(path: str, aliases: dict[str, str]) -> str:
    """The saved path of ``path`` when it runs through an alias (an object a
    ``Checkpoint`` saved once, under its first path): ``b/w`` -> ``a/w`` if ``b`` -> ``a``."""
    for _ in range(_MAX_ALIAS_HOPS):
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            alias_of = aliases.get("/".join(parts[:i]))
            if alias_of is not None:
                path = "/".join([alias_of, *parts[i:]])
                break
        else:
            return path
    return path  # a crafted alias loop: reported as missing


def _structure(metadata: CheckpointMetadata, source: str):
    """``(children {path: [names]}, kinds {container path: kind}, aliases {path: path})``."""
    graph = metadata.object_graph
    if isinstance(graph, dict) and graph.get("format") == GRAPH_FORMAT:
        nodes, aliases = check_graph(graph, source=source)
        kinds = {p: n["kind"] for p, n in nodes.items() if n["kind"] in CONTAINER_KINDS}
        return {p: list(nodes[p]["children"]) for p in kinds}, kinds, aliases
    kinds: dict[str, str] = {"": "dict"}
    if isinstance(graph, dict) and graph.get("kind") == "pytree" and "containers" in graph:
        kinds = graph["containers"]
        if not isinstance(kinds, dict) or not all(
            isinstance(p, str) and p not in metadata.arrays and k in ("dict", "list")
            for p, k in kinds.items()
        ):
            raise CorruptCheckpointError(f"{source}: malformed pytree 'containers' {kinds!r}")
        if not kinds:
            if list(metadata.arrays) != [_LEAF_ROOT]:
                raise CorruptCheckpointError(
                    f"{source}: a single-leaf pytree must hold one array {_LEAF_ROOT!r}, "
                    f"found {sorted(metadata.arrays)[:5]}"
                )
            return {}, {}, {}
        kinds = dict(kinds)
    children: dict[str, dict[str, None]] = {}  # dicts as ordered sets
    for path in metadata.arrays:
        parts = path.split("/")
        for i in range(len(parts)):
            parent = "/".join(parts[:i])
            kinds.setdefault(parent, "dict")
            children.setdefault(parent, {})[parts[i]] = None
    return children, kinds, {}
