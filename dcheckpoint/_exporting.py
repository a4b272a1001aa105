"""ExportingCheckpointManager: checkpoints plus a serving artifact under the same number.

The serving artifact is JAX's counterpart of a SavedModel: the serving function
compiled by ``jax.export`` to its portable serialized form (StableHLO, no Python), and
the parameters it closes over, saved by the engine as an ordinary checkpoint. Layout::

    <directory>/<savedmodel_name>-<N>/
        params/                 a dcheckpoint checkpoint: leaf i of the params at "params/i"
        serving_fn.jax_export   bytes of ``jax.export.Exported.serialize()``
        manifest.json           written last by the coordinator: the artifact's commit marker

Nothing is pickled: the function is jax.export's format only and the params are Zarr
arrays. :func:`load_savedmodel` gives back a callable in any process, with no access
to the Python code that defined the function.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time

import jax
import numpy as np

from . import _engine
from ._comm import agree, run_ordered
from ._manager import CheckpointManager, _iterate, _wait_for_new
from ._options import CheckpointOptions
from ._state_file import delete_checkpoint
from ._storage import LocalStorage, is_url
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CoordinationError,
    CorruptCheckpointError,
)

__all__ = ["ExportingCheckpointManager", "LoadedSavedModel", "load_savedmodel"]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FUNCTION_FILE = "serving_fn.jax_export"
PARAMS_DIR = "params"
_FORMAT = "dcheckpoint.SavedModel"
_VERSION = 1
_MAX_MANIFEST_BYTES = 1 << 20
# A serialized jax.export function is a flatbuffer, which cannot exceed 2 GiB.
_MAX_FUNCTION_BYTES = 1 << 31


def _is_committed_savedmodel(path: str) -> bool:
    return LocalStorage(path).exists(MANIFEST_FILE)


def _delete_savedmodel(path: str) -> bool:
    """Deletes one artifact: the manifest first, so a partial deletion is never loaded."""
    return delete_checkpoint(path, marker=MANIFEST_FILE)


def _spec_of(value) -> jax.ShapeDtypeStruct:
    """Shape and dtype only: the artifact is exported for one device, whatever the mesh."""
    dtype = value.dtype if hasattr(value, "dtype") else np.result_type(value)
    return jax.ShapeDtypeStruct(np.shape(value), dtype)


class ExportingCheckpointManager(CheckpointManager):
    """A :class:`CheckpointManager` that also exports a serving artifact on each save.

    Each save first writes ``<directory>/<savedmodel_name>-<N>`` (synchronously, on
    every process: the params are saved collectively), then the checkpoint ``N`` as
    the plain manager does (async if the options say so). Artifacts follow the
    checkpoints' retention: when checkpoint ``N`` is deleted, so is artifact ``N``.

    Args:
      checkpoint, directory, max_to_keep, keep_checkpoint_every_n_hours,
      checkpoint_name, step_counter, checkpoint_interval, init_fn: as
        :class:`CheckpointManager`.
      serving_fn: ``serving_fn(params, *inputs) -> outputs``, traceable by ``jax.jit``.
      params_fn: ``params_fn() -> params``, called at each save for the current
        parameters: a pytree of arrays of standard containers (dict, list, tuple) so
        that ``jax.export`` can serialize its structure.
      input_specs: one ``jax.ShapeDtypeStruct`` (or pytree of them) per input; shapes
        may use ``jax.export.symbolic_shape`` dimensions (e.g. a free batch size).
      best_fn, best_mode: as :class:`CheckpointManager`; an artifact goes with its
        checkpoint. (``save_on_preemption`` is not offered here: an export on the way
        out would spend the grace period.)
      savedmodel_name: artifacts are ``<directory>/<savedmodel_name>-<N>``.
      platforms: platforms to export for (``jax.export``'s argument); default: the
        current backend.
    """

    def __init__(
        self,
        checkpoint,
        directory,
        max_to_keep,
        keep_checkpoint_every_n_hours=None,
        checkpoint_name="ckpt",
        step_counter=None,
        checkpoint_interval=None,
        init_fn=None,
        *,
        serving_fn,
        params_fn,
        input_specs,
        savedmodel_name="savedmodel",
        platforms=None,
        best_fn=None,
        best_mode="max",
    ):
        if is_url(directory):
            raise ValueError(
                f"ExportingCheckpointManager writes serving artifacts to a local or shared "
                f"filesystem only; got the object store location {directory!r}"
            )
        from ._manager import _check_checkpoint_name  # here: keeps the import block as is

        _check_checkpoint_name(savedmodel_name, what="savedmodel_name")
        if savedmodel_name == checkpoint_name:
            raise ValueError(
                f"savedmodel_name and checkpoint_name must differ, both are {savedmodel_name!r}"
            )
        self._serving_fn = serving_fn
        self._params_fn = params_fn
        self._input_specs = tuple(input_specs)
        self._savedmodel_name = savedmodel_name
        self._platforms = platforms
        self._savedmodel_pattern = re.compile(rf"^{re.escape(savedmodel_name)}-(\d+)$")
        super().__init__(
            checkpoint,
            directory,
            max_to_keep,
            keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
            checkpoint_name=checkpoint_name,
            step_counter=step_counter,
            checkpoint_interval=checkpoint_interval,
            init_fn=init_fn,
            best_fn=best_fn,
            best_mode=best_mode,
        )

    def save(self, checkpoint_number=None, check_interval=True, options=None, *,
             metadata=None) -> str | None:
        """Exports artifact ``N``, then saves checkpoint ``N``; see CheckpointManager.save."""
        # A refusal is raised in the export's first step, which every process joins.
        metadata, checkpoint_number, refused = self._checked(checkpoint_number, metadata)
        before = self._numbering()
        number = self._next_number(checkpoint_number, check_interval)
        if number is None:
            if refused is not None:
                raise refused  # nobody exports or saves at this call
            return None
        try:
            self._checkpoint.sync()  # an earlier async save's failure is raised first
            artifact = self._export(number, options or CheckpointOptions(), refused)
        except Exception:
            self._take_back(before)
            if refused is not None:
                raise refused from None  # the others raise the export error naming it
            raise
        try:
            return self._write(number, options, metadata)
        except Exception:
            # Every process raises the same save error (see _engine.save_failed_here);
            # artifact N must not outlive the checkpoint it belongs to, unless that
            # committed and only a step after it failed. (An async save that fails
            # later is caught by the next manager's start, in _remove_leftovers.)
            if not self._checkpoint._committed(f"{self._prefix}-{number}"):
                if self._comm.is_coordinator:
                    _delete_savedmodel(artifact)
                self._take_back(before)
            raise

    def _export(self, number: int, options: CheckpointOptions,
                refused: Exception | None = None) -> str:
        """Writes one artifact (all processes; small files and commit: coordinator).

        The function is exported here, on the caller's thread; writing it is two
        `_comm.agree` steps around a save, run in the job's order of collectives
        (after an async save in flight). A process whose ``params_fn`` or export failed
        still takes part, so every process raises the same error.
        """
        path = os.path.join(self._directory, f"{self._savedmodel_name}-{number}")
        try:
            if refused is not None:  # this process's save was refused before the export
                raise refused
            params = self._params_fn()
            leaves = jax.tree.leaves(params)
            exported = jax.export.export(jax.jit(self._serving_fn), platforms=self._platforms)(
                jax.tree.map(_spec_of, params), *self._input_specs
            )
            identity = {"path": path, "params": len(leaves)}
        except Exception as e:  # reported by the coordinator, on every process
            leaves = exported = None
            identity = {"error": f"process {self._comm.process_index}: {type(e).__name__}: {e}"}
        tag = f"export {path!r}"
        timeout_secs = options.timeout_secs

        def start(identities: list) -> None:
            failures = [i["error"] for i in identities if "error" in i]
            if failures:
                raise CheckpointError(f"Exporting {path!r} failed: " + "; ".join(failures))
            if any(i != identities[0] for i in identities):
                raise CoordinationError(
                    f"The processes export different artifacts (in process order: "
                    f"{identities}); every process must make the same calls"
                )
            _delete_savedmodel(path)  # a user-given number may repeat one
            LocalStorage(path).make_dirs()

        def commit(_: list) -> None:
            LocalStorage(path).write_bytes_atomic(FUNCTION_FILE, bytes(exported.serialize()))
            manifest = {
                "format": _FORMAT,
                "version": _VERSION,
                "number": number,
                "param_count": len(leaves),
                "input_specs": [str(spec) for spec in jax.tree.leaves(self._input_specs)],
                "platforms": list(exported.platforms),
                "saved_at": time.time(),
            }
            LocalStorage(path).write_bytes_atomic(
                MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode()
            )
            logger.info("exported %s", path)

        def run() -> str:
            agree(self._comm, identity, start, kind="export start", tag=tag + " start",
                  timeout_secs=timeout_secs)
            _engine.save_arrays(
                os.path.join(path, PARAMS_DIR),
                {f"params/{i}": leaf for i, leaf in enumerate(leaves)},
                object_graph={"savedmodel_params": len(leaves)},
                options=options,
                comm=self._comm,
            )
            agree(self._comm, None, commit, kind="export commit", tag=tag + " commit",
                  timeout_secs=timeout_secs)
            return path

        return run_ordered(run)

    def _remove_leftovers(self) -> None:
        super()._remove_leftovers()
        for path in self._savedmodel_dirs(committed=False):
            number = path.rsplit("-", 1)[-1]
            checkpoint = os.path.join(self._directory, f"{self._checkpoint_name}-{number}")
            if not _is_committed_savedmodel(path):
                _delete_savedmodel(path)
                logger.info("removed unfinished export %s", path)
            elif not _engine.is_committed(checkpoint):
                _delete_savedmodel(path)  # its checkpoint's save failed or was cut short
                logger.info("removed export %s: checkpoint %s was never committed",
                            path, checkpoint)

    def _delete(self, path: str) -> None:
        super()._delete(path)
        number = path.rsplit("-", 1)[-1]
        savedmodel = os.path.join(self._directory, f"{self._savedmodel_name}-{number}")
        if _delete_savedmodel(savedmodel):
            logger.info("deleted old export %s", savedmodel)

    def _savedmodel_dirs(self, *, committed: bool) -> list[str]:
        """Artifact directories on disk, by number (oldest first)."""
        names = LocalStorage(self._directory).list_dir()
        found = sorted(
            (int(match.group(1)), os.path.join(self._directory, name))
            for name in names
            if (match := self._savedmodel_pattern.match(name))
        )
        return [p for _, p in found if not committed or _is_committed_savedmodel(p)]

    def get_existing_savedmodels(self) -> list[str]:
        """Every committed artifact on disk (managed or preserved), oldest first."""
        return self._savedmodel_dirs(committed=True)

    @property
    def savedmodels(self) -> list[str]:
        """Committed artifacts of the managed checkpoints, oldest first."""
        managed = {path.rsplit("-", 1)[-1] for path in self.checkpoints}
        return [p for p in self.get_existing_savedmodels() if p.rsplit("-", 1)[-1] in managed]

    @property
    def latest_savedmodel(self) -> str | None:
        """The committed artifact with the highest number, or None."""
        existing = self.get_existing_savedmodels()
        return existing[-1] if existing else None

    def get_savedmodel_number_from_path(self, path) -> int | None:
        """``N`` of ``.../<savedmodel_name>-N``, or None when the path names no artifact.

        None, not an error, as TF's: callers filter directory listings with it.
        """
        name = os.path.basename(os.path.normpath(os.fspath(path)))
        match = self._savedmodel_pattern.match(name)
        return int(match.group(1)) if match else None

    def wait_for_new_savedmodel(self, last_savedmodel, seconds_to_sleep=1.0, timeout=None):
        """Waits for a latest artifact other than ``last_savedmodel``; None on timeout."""
        return _wait_for_new(
            lambda: self.latest_savedmodel, last_savedmodel, seconds_to_sleep, timeout
        )

    def savedmodels_iterator(
        self, min_interval_secs=0, timeout=None, timeout_fn=None, *, seconds_to_sleep=1.0
    ):
        """Yields each new latest artifact, as :func:`checkpoints_iterator` does."""
        return _iterate(
            lambda last: self.wait_for_new_savedmodel(last, seconds_to_sleep, timeout),
            min_interval_secs,
            timeout_fn,
        )


class LoadedSavedModel:
    """A loaded artifact: call it with the inputs, as the exported ``serving_fn``.

    Attributes:
      params: the restored parameters (host arrays), in their saved structure.
      exported: the deserialized ``jax.export.Exported``.
    """

    def __init__(self, exported, params):
        self.exported = exported
        self.params = params

    def __call__(self, *inputs):
        return self.exported.call(self.params, *inputs)


def _read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST_FILE)
    try:
        data = LocalStorage(path).read_bytes(MANIFEST_FILE, max_bytes=_MAX_MANIFEST_BYTES)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise CheckpointNotFoundError(
            f"No exported artifact at {path!r}: expected a committed {MANIFEST_FILE}"
        ) from error
    try:
        manifest = json.loads(data)
        if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
            raise ValueError(f"expected format {_FORMAT!r} version {_VERSION}")
        count = manifest["param_count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"param_count must be a non-negative int, found {count!r}")
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CorruptCheckpointError(f"Manifest {manifest_path!r} is malformed: {error}") from error
    return manifest


def _read_exported(path: str):
    serialized = LocalStorage(path).read_bytes(FUNCTION_FILE, max_bytes=_MAX_FUNCTION_BYTES)
    try:
        return jax.export.deserialize(bytearray(serialized))
    except Exception as error:  # flatbuffers raises assorted types on bad bytes
        raise CorruptCheckpointError(
            f"{os.path.join(path, FUNCTION_FILE)!r} is not a jax.export serialization: {error}"
        ) from error


def _params_tree(path: str, exported, count: int):
    # in_tree is ((params, *inputs), {}): the first argument's structure is the params'.
    params_tree = exported.in_tree.children()[0].children()[0]
    if params_tree.num_leaves != count:
        raise CorruptCheckpointError(
            f"Artifact {path!r}: the function takes {params_tree.num_leaves} param leaves, "
            f"the manifest lists {count}"
        )
    return params_tree


def savedmodel_as_checkpoint(path) -> tuple[str, _engine.CheckpointMetadata] | None:
    """``(params directory, its metadata with the params named by their key paths)`` of
    a committed artifact; None when ``path`` is not one.

    TF's ``Checkpoint.restore(saved_model_dir)`` loads a SavedModel's variables into
    the objects of the same names; the params here are stored by leaf index, so the
    key paths of the exported function's params argument give them their names
    (``{"model": {"w": ...}}`` -> ``model/w``), under ``save_pytree``'s rule.
    """
    path = os.fspath(path)
    if is_url(path) or not _is_committed_savedmodel(path):
        return None
    from ._pytree import pytree_arrays  # here: _pytree is above the exporter's layer

    count = _read_manifest(path)["param_count"]
    params_tree = _params_tree(path, _read_exported(path), count)
    named, graph = pytree_arrays(jax.tree.unflatten(params_tree, [np.int8(0)] * count))
    params_dir = os.path.join(path, PARAMS_DIR)
    metadata = _engine.read_metadata(params_dir)
    by_index = [metadata.arrays.get(f"params/{i}") for i in range(count)]
    if None in by_index:
        raise CorruptCheckpointError(
            f"Artifact {path!r}: its params checkpoint lacks some of params/0..{count - 1}"
        )
    arrays = dict(zip(named, by_index, strict=True))
    return params_dir, dataclasses.replace(metadata, arrays=arrays, object_graph=graph)


def load_savedmodel(path) -> LoadedSavedModel:
    """Loads an artifact written by :class:`ExportingCheckpointManager`.

    Works in any process: it needs neither the serving function's Python code nor the
    mesh it was trained on. The params come back as host arrays and the function runs
    on the default device.

    Raises:
      CheckpointNotFoundError: ``path`` holds no committed artifact.
      CorruptCheckpointError: the manifest or the serialized function is malformed.
    """
    path = os.fspath(path)
    count = _read_manifest(path)["param_count"]
    exported = _read_exported(path)
    params_tree = _params_tree(path, exported, count)
    restored = _engine.restore_arrays(
        os.path.join(path, PARAMS_DIR), {f"params/{i}": None for i in range(count)}
    )
    params = jax.tree.unflatten(params_tree, [restored[f"params/{i}"] for i in range(count)])
    return LoadedSavedModel(exported, params)
