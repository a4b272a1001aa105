"""``Checkpoint``: TensorFlow's ``tf.train.Checkpoint`` object API over JAX values.

``save``/``write`` flatten the object graph (``_tracking.flatten``) and hand the arrays
to the checkpoint's ``Saver`` (sync or async). ``restore``/``read`` read the metadata
once and walk the *current* objects (``_Restorer``), assigning what matches, parking
what has no object yet (deferred restoration) and recording both in the load status.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcheckpoint import _engine, _paths
from dcheckpoint._async import Saver
from dcheckpoint._comm import default_communicator
from dcheckpoint._leaf import leaf_target
from dcheckpoint._log import log_restore
from dcheckpoint._options import CheckpointOptions
from dcheckpoint._plan import python_type
from dcheckpoint._state_file import CheckpointState, get_checkpoint_state, write_checkpoint_state
from dcheckpoint._status import (
    SAVE_COUNTER,
    CheckpointLoadStatus,
    InitializationOnlyStatus,
    MatchState,
)
from dcheckpoint._tracking import (
    ARRAY_KINDS,
    LEAF_KINDS,
    AutoTrackable,
    check_graph,
    children,
    classify,
    decode_state,
    escape,
    flatten,
    get_inner,
    has_identity,
    join,
    leaf_paths,
    placeholder_paths,
    pytree_children,
    set_inner,
)
from dcheckpoint._user_metadata import check_user_metadata
from dcheckpoint._variable import Variable
from dcheckpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    StaleStateWarning,
)

__all__ = ["Checkpoint"]


class _Restorer:
    """One checkpoint's graph, matched against the current objects by two walks.

    ``batched`` runs a walk twice: a ``_ReadPlanner`` walk assigns nothing and records
    the engine target of every leaf it meets, so that one ``restore_arrays`` call reads
    them all concurrently instead of one leaf at a time; a ``_Walker`` walk then assigns
    those arrays. Both walks share ``_Walk``'s matching, so the planner also raises any
    mismatch before anything is assigned.

    Args:
      directory: the checkpoint directory (values are read lazily from it).
      metadata: its ``CheckpointMetadata``.
      state: the ``MatchState`` the load status reports from.
      host_target: the engine target of values with no sharding of their own (numpy
        leaves); ``None`` means "host numpy".
      cast_dtypes: cast saved values to the object's dtype where they differ (opt-in).

    Deferred restores hold this object, never a walk, so that a walk's memo (which pins
    the values it replaced, device arrays included) dies with the walk.
    """

    def __init__(self, directory, metadata, state: MatchState, host_target,
                 cast_dtypes: bool = False, reader=None):
        self.directory, self.metadata, self.state = directory, metadata, state
        self.nodes, self.aliases = check_graph(metadata.object_graph, source=str(directory))
        self.host_target, self.cast_dtypes = host_target, cast_dtypes
        # {path: target} -> {path: value}: the engine's, or another source's (the local
        # tier's, whose reads are collective).
        self._read = reader or functools.partial(
            _engine.restore_arrays, directory, metadata=metadata)

    def batched(self, walk):
        """Runs ``walk(planner)``, reads every leaf it wants in one engine call, then
        runs ``walk(walker)`` with those arrays; returns the walker's result."""
        wanted: dict = {}
        walk(_ReadPlanner(self, wanted))
        prefetched = self._read(wanted)
        return walk(_Walker(self, prefetched))

    def read(self, ckpt_path: str, target):
        """One leaf, read on its own."""
        return self._read({ckpt_path: target})[ckpt_path]

    def graph_values(self) -> frozenset[str]:
        """Paths of the values stored in the graph itself (strings, None, process states)."""
        return frozenset(p for p, n in self.nodes.items()
                         if n["kind"] in ("value", "process_state"))

    def node(self, ckpt_path: str) -> dict | None:
        """The checkpoint's node at ``ckpt_path``, following aliases; ``None`` if absent."""
        return self.nodes.get(self.aliases.get(ckpt_path, ckpt_path))

    def defer_missing(self, owner: AutoTrackable, items, node, ckpt_path, cur_path) -> None:
        """Parks the checkpoint children of ``node`` that ``owner`` lacks, on ``owner``."""
        present = {escape(name) for name, _ in items}
        for name in node["children"]:
            if name in present or name == SAVE_COUNTER and not ckpt_path:
                continue
            attach = functools.partial(
                self.attach, ckpt_path=join(ckpt_path, name), cur_path=join(cur_path, name)
            )
            owner._dc_defer(_paths.unescape(name), attach)

    def attach(self, value, *, ckpt_path: str, cur_path: str):
        """Restores a value attached after the restore (deferred), its leaves batched."""
        return self.batched(lambda walker: walker.restore(value, ckpt_path, cur_path))


class _Walk:
    """One walk of the current objects against the graph, path by path, with a memo.

    Subclasses say what a matched leaf does (``_array``, ``_value``,
    ``_process_state``) and whether missing children are deferred (``_defer``).
    """

    def __init__(self, source: _Restorer):
        self._source = source
        self._state = source.state
        self._memo: dict[int, object] = {}
        self._keep: list[object] = []  # keeps memo ids from being reused mid-walk

    def restore(self, value, ckpt_path: str, cur_path: str):
        """Restores ``value`` from ``ckpt_path``; returns what its parent should now hold."""
        ckpt_path = self._source.aliases.get(ckpt_path, ckpt_path)
        kind = classify(value)
        if kind is None or kind == "empty":
            return value
        if has_identity(value) and id(value) in self._memo:
            return self._memo[id(value)]
        node = self._source.nodes.get(ckpt_path)
        if node is None:
            self._unmatched(value, ckpt_path, cur_path)
            return value
        if kind in LEAF_KINDS:
            new = self._restore_leaf(value, kind, node, ckpt_path, cur_path)
        else:
            if kind != "pytree":
                # Updated in place, so it is its own result: a cycle back to it stops here.
                self._memo[id(value)] = value
            new = self._restore_container(value, kind, node, ckpt_path, cur_path)
        if has_identity(value):
            self._memo[id(value)] = new
            self._keep.append(value)
        return new

    def _restore_leaf(self, value, kind, node, ckpt_path, cur_path):
        if kind == "process_state" or node["kind"] == "process_state":
            return self._restore_process_state(value, kind, node, ckpt_path, cur_path)
        if node["kind"] == "value":
            if kind != "value" and python_type(value) is None:
                raise CheckpointMismatchError(
                    f"{cur_path!r}: expected an array in the checkpoint at {ckpt_path!r}, "
                    f"found the value {node['value']!r}"
                )
            return self._value(ckpt_path, node)
        if node["kind"] not in ARRAY_KINDS:
            raise CheckpointMismatchError(
                f"{cur_path!r}: expected an array in the checkpoint at {ckpt_path!r}, "
                f"found a {node['kind']} node"
            )
        meta = self._source.metadata.arrays.get(ckpt_path)
        if meta is None:
            raise CorruptCheckpointError(
                f"{self._source.directory}: {ckpt_path!r} is in the object graph but no "
                f"array is stored for it"
            )
        inner = get_inner(value) if kind == "variable" else value
        target, convert, check_early = leaf_target(
            inner, meta, ckpt_path, cur_path, self._source.host_target,
            cast=self._source.cast_dtypes)
        return self._array(value, kind, ckpt_path, target, convert, check_early)

    def _restore_process_state(self, value, kind, node, ckpt_path, cur_path):
        """Gives this process its own saved ``get_state()`` through ``set_state``."""
        if kind != node["kind"]:
            raise CheckpointMismatchError(
                f"{cur_path!r}: the checkpoint holds a {node['kind']} at {ckpt_path!r}, the "
                f"object is a {type(value).__name__} ({kind})"
            )
        states, count = node["states"], jax.process_count()
        if len(states) != count:
            raise CheckpointMismatchError(
                f"{cur_path!r}: per-process state saved by {len(states)} processes cannot "
                f"be restored by {count}: each process resumes its own position. Restore "
                f"with a Checkpoint that does not hold this object (its iterator then "
                f"starts afresh) and call expect_partial() on the status"
            )
        self._process_state(value, ckpt_path, decode_state(ckpt_path, states[jax.process_index()]))
        return value

    def _restore_container(self, value, kind, node, ckpt_path, cur_path):
        if node["kind"] in LEAF_KINDS:
            raise CheckpointMismatchError(
                f"{cur_path!r}: expected a {kind} in the checkpoint at {ckpt_path!r}, "
                "found an array"
            )
        items = children(value, kind)
        restored = self.restore_children(items, node, ckpt_path, cur_path)
        changed = [
            (i, new)
            for i, ((_, old), new) in enumerate(zip(items, restored, strict=True))
            if new is not old
        ]
        if kind == "pytree":
            if not changed:
                return value
            return pytree_children(value)[1].unflatten(restored)
        keys = list(value) if kind == "dict" else None
        for i, new in changed:
            if kind == "trackable":
                object.__setattr__(value, items[i][0], new)
            elif kind == "object":
                setattr(value, items[i][0], new)  # an nnx module: its own __setattr__
            elif kind == "dict":
                value[keys[i]] = new
            else:
                value[i] = new
        if kind == "trackable":
            self._defer(value, items, node, ckpt_path, cur_path)
        return value

    def restore_children(self, items, node, ckpt_path, cur_path) -> list:
        """Restores each ``(name, child)`` present in ``node``; returns the new children."""
        saved = set(node["children"])
        out = []
        for name, child in items:
            name = escape(name)
            if name in saved:
                out.append(self.restore(child, join(ckpt_path, name), join(cur_path, name)))
            else:
                self._unmatched(child, join(ckpt_path, name), join(cur_path, name))
                out.append(child)
        return out

    def _unmatched(self, value, ckpt_path: str, cur_path: str) -> None:
        """Records an object the checkpoint holds nothing for; an abstract placeholder
        there is an error, since the restore would return with it unfilled."""
        placeholders = placeholder_paths(value, cur_path)
        if placeholders:
            raise CheckpointMismatchError(
                f"{placeholders[:5]}: abstract placeholders (jax.ShapeDtypeStruct) that "
                f"the checkpoint {self._source.directory!r} holds no value for (expected "
                f"at {ckpt_path!r}); a restore would leave them unfilled. Give those "
                "objects concrete initial values, or restore a checkpoint that has them"
            )
        self._state.unmatched_objects.update(leaf_paths(value, cur_path))


class _ReadPlanner(_Walk):
    """A walk that assigns nothing: it records ``{ckpt path: engine target}`` in
    ``wanted`` for the one batched read, and raises any mismatch first."""

    def __init__(self, source: _Restorer, wanted: dict):
        super().__init__(source)
        self._wanted = wanted

    def _array(self, value, kind, ckpt_path, target, convert, check_early):
        if check_early:
            # A saved scalar cast into an array: check the cast now, so that a refusal
            # comes before anything is assigned (one tiny read).
            convert(self._source.read(ckpt_path, None))
        # setdefault: a second object restored from the same path (a shared object that
        # is no longer shared) must not take the first one's target.
        self._wanted.setdefault(ckpt_path, target)
        return value

    def _value(self, ckpt_path, node):
        return node["value"]

    def _process_state(self, value, ckpt_path, state) -> None:
        pass

    def _defer(self, owner, items, node, ckpt_path, cur_path) -> None:
        pass


class _Walker(_Walk):
    """A walk that assigns: leaves from ``prefetched`` (the planner's batched read); a
    leaf missing from it (a second object restored from the same path) is read alone."""

    def __init__(self, source: _Restorer, prefetched: dict):
        super().__init__(source)
        self._prefetched = prefetched

    def _array(self, value, kind, ckpt_path, target, convert, check_early):
        array = self._prefetched.pop(ckpt_path, None)  # pop: no reference kept alive
        if array is None:
            array = self._source.read(ckpt_path, target)
        self._state.consumed.add(ckpt_path)
        array = convert(array)
        return set_inner(value, array) if kind == "variable" else array

    def _value(self, ckpt_path, node):
        self._state.consumed.add(ckpt_path)
        return node["value"]

    def _process_state(self, value, ckpt_path, state) -> None:
        value.set_state(state)
        self._state.consumed.add(ckpt_path)

    def _defer(self, owner, items, node, ckpt_path, cur_path) -> None:
        self._source.defer_missing(owner, items, node, ckpt_path, cur_path)


def _open(save_path) -> tuple[str, object]:
    """``(directory, metadata)`` to restore from: a checkpoint, or the parameters of an
    exported artifact (TF restores a SavedModel's variables the same way)."""
    from dcheckpoint._exporting import savedmodel_as_checkpoint  # the layer above

    found = savedmodel_as_checkpoint(save_path)
    return found if found is not None else (save_path, _engine.read_metadata(save_path))


def _record_latest(save_path: str) -> None:
    """(coordinator) Makes ``save_path`` the directory's latest checkpoint, as TF's
    ``Checkpoint.save`` does: the state file then lists that checkpoint alone."""
    if not default_communicator().is_coordinator:
        return
    save_path = os.fspath(save_path)
    directory = os.path.dirname(save_path) or os.curdir
    try:
        previous = get_checkpoint_state(directory)
        now = time.time()
        write_checkpoint_state(directory, CheckpointState(
            model_checkpoint_path=save_path,
            all_model_checkpoint_paths=(save_path,),
            all_model_checkpoint_timestamps=(now,),
            last_preserved_timestamp=previous.last_preserved_timestamp if previous else now,
        ))
    except (OSError, CorruptCheckpointError) as e:
        raise CheckpointError(
            f"Checkpoint {save_path!r} is committed and restorable, but recording it in "
            f"the state file of {directory!r} failed: {e}"
        ) from e


def _root_children(root) -> dict[str, object]:
    """The top-level children ``root`` gives a Checkpoint, checked; ``{}`` for no root."""
    if root is None:
        return {}
    kind = classify(root)
    if kind not in ("trackable", "object", "dict", "list"):
        # A leaf root has no children to save, and an immutable pytree root cannot have
        # its rebuilt children assigned back on restore.
        raise ValueError(
            "Checkpoint root must be an AutoTrackable, dict or list (restore assigns "
            f"into it), got {type(root).__name__}"
        )
    found = dict(children(root, kind))
    if SAVE_COUNTER in found:
        raise ValueError(
            f"Checkpoint root has a child named {SAVE_COUNTER!r}, which is reserved for "
            "Checkpoint's own counter"
        )
    return found


class Checkpoint(AutoTrackable):
    """Groups trackable objects and saves/restores them together (``tf.train.Checkpoint``).

    Keyword arguments (and attributes set later) become the top-level names of the
    checkpoint; with ``root`` the root's own attributes are the top level and keyword
    arguments are added beside them. ``save`` numbers checkpoints with ``save_counter``;
    ``write``/``read`` are the unnumbered pair used by ``CheckpointManager``.

    Args:
      root: optional object whose children form the top level of the graph.
      **kwargs: objects to track, by name (Variables, AutoTrackables, dicts, lists,
        arrays, pytrees).

    Raises:
      ValueError: ``root`` is not an ``AutoTrackable``, dict or list (restore assigns
        into it), or has a ``save_counter``; a keyword argument is not trackable, is
        named ``save_counter``, or conflicts with an attribute ``root`` already has.

    Example:
      >>> model = AutoTrackable()
      >>> model.kernel = Variable(jnp.zeros((4, 2)))
      >>> ckpt = Checkpoint(model=model, opt_state=optax_state)
      >>> path = ckpt.save("/tmp/run/ckpt")          # "/tmp/run/ckpt-1"
      >>> model.kernel.assign(jnp.ones((4, 2)))
      >>> ckpt.restore(path).assert_consumed()        # kernel is zeros again
      >>> ckpt.save_counter.value                     # 1
    """

    def __init__(self, root: Any = None, **kwargs: Any) -> None:
        object.__setattr__(self, "_dc_root", root)
        object.__setattr__(self, "_dc_counter", None)
        object.__setattr__(self, "_dc_saver", Saver())
        root_children = _root_children(root)
        for key, value in sorted(kwargs.items()):
            if key == SAVE_COUNTER:
                raise ValueError("'save_counter' is reserved for Checkpoint's own counter")
            if key.startswith("_dc_"):
                raise ValueError(
                    f"Keyword argument {key!r}: names starting with '_dc_' are reserved for "
                    "Checkpoint's own state and would not be saved"
                )
            if classify(value) is None:
                raise ValueError(
                    f"Checkpoint was expecting a trackable object for {key!r} (a Variable, "
                    f"AutoTrackable, dict, list, array or pytree), got {type(value).__name__}"
                )
            if key in root_children and root_children[key] is not value:
                raise ValueError(
                    f"Cannot create a Checkpoint with keyword argument {key!r} if "
                    f"root.{key} already exists."
                )
            setattr(self, key, value)

    @property
    def save_counter(self) -> Variable:
        """The number of ``save`` calls, a ``Variable`` saved and restored with the rest."""
        if self._dc_counter is None:
            object.__setattr__(self, "_dc_counter", Variable(jnp.zeros((), jnp.int32)))
        return self._dc_counter

    def _dc_top(self) -> list[tuple[str, object]]:
        """The top-level ``(name, value)`` children of the graph."""
        top = children(self, "trackable")
        if self._dc_root is not None:
            names = {name for name, _ in top}
            own = children(self._dc_root, classify(self._dc_root))
            top = [(n, v) for n, v in own if n not in names] + top
        if self._dc_counter is not None:
            top.append((SAVE_COUNTER, self._dc_counter))
        return top

    def _dc_host_target(self):
        """Where values with no sharding of their own are restored: host numpy."""
        return None

    def save(self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None,
             *, metadata: dict | None = None) -> str:
        """Increments ``save_counter`` and writes ``f"{file_prefix}-{save_counter}"``.

        A save that raises (on every process: see `_engine.save_failed_here`) leaves
        ``save_counter`` as it was, so the processes keep counting alike.

        Once committed, the checkpoint is recorded as the latest in the directory's
        state file (``checkpoint``, written by the coordinator), so
        ``latest_checkpoint(dirname(file_prefix))`` finds it, as TF's ``save`` does. No
        retention: older checkpoints stay on disk and leave the state file's list
        (use a ``CheckpointManager`` to keep a list and delete old ones).

        ``metadata``: as for :meth:`write`.

        Returns:
          The checkpoint path, to pass to ``restore``.
        """
        counter = self.save_counter
        try:  # before the counter moves: a refused save changes nothing
            check_user_metadata(metadata)
        except Exception as e:  # the other processes are (or will be) in the save
            self._dc_saver.sync()  # as they do first: an earlier save's error wins
            _engine.save_failed_here(f"{file_prefix}-{int(np.asarray(counter.value)) + 1}",
                                     e, options=options)
        before = np.asarray(counter.value)
        counter.assign(before + 1)
        path = f"{file_prefix}-{int(np.asarray(counter.value))}"
        try:
            return self.write(path, options, on_commit=_record_latest, metadata=metadata)
        except Exception:
            # Nothing was saved, on any process (a save fails everywhere or nowhere), so
            # every process takes the count back alike; a process that failed before the
            # counter moved (above) keeps the same count as the others. A save that
            # committed and then failed after (on_commit, callbacks) keeps its count.
            if not self._committed(path):
                counter.assign(before)
            raise

    def write(self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None,
              *, on_commit: Callable[[str], None] | None = None,
              metadata: dict | None = None) -> str:
        """Writes one checkpoint at exactly ``file_prefix``; ``save_counter`` is untouched.

        Args:
          file_prefix: the checkpoint directory to create.
          options: ``CheckpointOptions`` (``enable_async`` returns before the write).
          on_commit: called with the path once the checkpoint is committed.
          metadata: a small JSON dict stored with the checkpoint (metrics, config hash,
            ...); ``read_metadata(path).user_metadata`` gives it back.

        Returns:
          ``file_prefix``.

        Raises:
          ValueError: ``metadata`` is not JSON or over 64 KiB (nothing is written).
        """
        try:
            user_metadata = check_user_metadata(metadata)
            arrays, graph = flatten(self._dc_top())
        except Exception as e:  # the other processes are (or will be) in the save
            self._dc_saver.sync()  # as they do first: an earlier save's error wins
            _engine.save_failed_here(file_prefix, e, options=options)
        self._warn_if_stale()
        if SAVE_COUNTER in arrays:
            # A host value: written once by the coordinator, whatever device holds it.
            arrays[SAVE_COUNTER] = np.asarray(arrays[SAVE_COUNTER])
        return self._dc_saver.save(
            file_prefix, arrays, object_graph=graph, options=options, on_commit=on_commit,
            user_metadata=user_metadata,
        )

    def _warn_if_stale(self) -> None:
        """Warns when an immutable top-level value (a TrainState, an optax state, a
        jax.Array) is saved again as the very object of the last save (for a NamedTuple,
        which takes no weak reference: holding the very same arrays).

        Such a value cannot change in place, so the training loop's new one lives under
        a rebound name (``state = state.replace(...)``) and every save writes the first
        state again. Weak references compare identities without keeping old arrays
        alive; a freed array never matches, so a new state is never taken for stale.
        """
        saved = {}
        for name, value in self._dc_top():
            if name == SAVE_COUNTER or classify(value) not in ("pytree", "array"):
                continue
            try:  # the object itself where it takes a weak reference (a TrainState)
                saved[name] = [weakref.ref(value)]
            except TypeError:  # a NamedTuple (optax state): its arrays
                leaves = [x for x in jax.tree.leaves(value) if isinstance(x, jax.Array)]
                if leaves:
                    saved[name] = [weakref.ref(x) for x in leaves]
        previous = vars(self).get("_dc_saved_leaves", {})
        stale = sorted(name for name, refs in saved.items()
                       if len(previous.get(name, ())) == len(refs) and all(
                           old() is new() for old, new in zip(previous[name], refs,
                                                               strict=True)))
        if stale:
            warnings.warn(
                f"Checkpoint attributes {stale} hold the same arrays as at the previous "
                "save: an immutable state (TrainState, optax state, jax.Array) replaced by "
                "a new object under a rebound name is not seen by the Checkpoint. Assign "
                f"the new value (ckpt.{stale[0]} = new_state) before saving, or use "
                "dcheckpoint.PytreeManager.save(step, state); ignore this if the value "
                "really did not change", StaleStateWarning, stacklevel=3)
        object.__setattr__(self, "_dc_saved_leaves", saved)

    def _committed(self, path: str) -> bool:
        """Whether the save to ``path`` that just raised committed first (see Saver)."""
        return self._dc_saver.committed == path

    def restore(self, save_path: str | os.PathLike | None,
                options: CheckpointOptions | None = None, *,
                cast_dtypes: bool = False) -> CheckpointLoadStatus | InitializationOnlyStatus:
        """Restores a ``save`` (or ``write``) output, ``save_counter`` included.

        ``cast_dtypes=True`` casts a saved value to its object's dtype where they differ
        (a bfloat16 checkpoint into a float32 eval model), on the object's devices; by
        default a dtype difference is a ``CheckpointMismatchError``. Shapes must match.

        Returns:
          A ``CheckpointLoadStatus``; for ``save_path=None`` an
          ``InitializationOnlyStatus`` (nothing restored, as in TF).

        Raises:
          CheckpointNotFoundError: no committed checkpoint at ``save_path``.
          CheckpointMismatchError: an existing object's shape or dtype differs.
        """
        if save_path is None:
            return InitializationOnlyStatus()
        self.save_counter  # noqa: B018  (created now, as TF does, so it is matched)
        return self.read(save_path, options, cast_dtypes=cast_dtypes)

    def read(self, save_path: str | os.PathLike, options: CheckpointOptions | None = None, *,
             cast_dtypes: bool = False) -> CheckpointLoadStatus:
        """Restores a ``write`` output; creates no ``save_counter``. ``cast_dtypes``: as
        ``restore``.

        Returns:
          The ``CheckpointLoadStatus``. Values whose object does not exist yet are
          restored when it is attached.
        """
        del options  # no CheckpointOptions field changes a restore (see README)
        save_path, metadata = _open(save_path)
        return self._dc_read(save_path, metadata, cast_dtypes=cast_dtypes)

    def _dc_read_from(self, source, *, cast_dtypes: bool = False) -> CheckpointLoadStatus:
        """Restores from another source of arrays than a checkpoint directory: an
        object with ``where``, ``metadata`` and ``read(targets)`` (the local tier's
        `LocalRestore`, whose reads are collective: every process restores alike)."""
        self.save_counter  # noqa: B018  (as restore: created now, so it is matched)
        return self._dc_read(source.where, source.metadata, source.read,
                             cast_dtypes=cast_dtypes)

    def _dc_flatten(self) -> tuple[dict, dict]:
        """``({array path: value}, object graph)`` of what a save writes now."""
        arrays, graph = flatten(self._dc_top())
        if SAVE_COUNTER in arrays:
            arrays[SAVE_COUNTER] = np.asarray(arrays[SAVE_COUNTER])
        return arrays, graph

    def _dc_read(self, save_path, metadata, reader=None, *,
                 cast_dtypes: bool = False) -> CheckpointLoadStatus:
        started = time.perf_counter()
        state = MatchState(checkpoint_paths=frozenset(), save_path=str(save_path))
        source = _Restorer(save_path, metadata, state, self._dc_host_target(), cast_dtypes,
                           reader)
        state.checkpoint_paths = frozenset(metadata.arrays) | source.graph_values()
        top, root = self._dc_top(), source.node("")
        restored = source.batched(lambda walker: walker.restore_children(top, root, "", ""))
        for (name, old), new in zip(top, restored, strict=True):
            if new is not old:
                self._dc_set_top(name, new)
        owner = self._dc_root if isinstance(self._dc_root, AutoTrackable) else self
        source.defer_missing(owner, top, root, "", "")
        graph = metadata.object_graph
        if isinstance(graph, dict) and graph.get("kind") == "pytree":
            state.unmatched_objects.discard(SAVE_COUNTER)  # save_pytree counts no saves
        log_restore(save_path, sum(metadata.arrays[p].nbytes for p in state.consumed
                                   if p in metadata.arrays),
                    time.perf_counter() - started)
        return CheckpointLoadStatus(state)

    def _dc_set_top(self, name: str, value) -> None:
        """Re-assigns a rebuilt top-level value on whichever object holds it."""
        if name in vars(self) or self._dc_root is None:
            object.__setattr__(self, name, value)
        elif isinstance(self._dc_root, dict):
            key = next(k for k in self._dc_root if str(k) == name)
            self._dc_root[key] = value
        elif isinstance(self._dc_root, list):
            self._dc_root[int(name)] = value
        elif isinstance(self._dc_root, AutoTrackable):
            object.__setattr__(self._dc_root, name, value)
        else:
            setattr(self._dc_root, name, value)  # an nnx module

    def sync(self) -> None:
        """Waits for an async save in flight; raises its error if it failed."""
        self._dc_saver.sync()
