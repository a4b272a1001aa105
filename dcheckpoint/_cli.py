"""The ``dcheckpoint`` console command: see and check checkpoints without writing Python.

  dcheckpoint ls DIR        the committed checkpoints in DIR, the latest marked
  dcheckpoint inspect CKPT  the tree of arrays of one checkpoint
  dcheckpoint verify CKPT   read every chunk back and check every checksum and coverage
  dcheckpoint rm CKPT       delete one checkpoint the safe way (marker first)

Each takes ``--json`` for scripts. Locations may be local paths or object store URLs
(``s3://bucket/run``). Exit status: 0 success, 1 ``verify`` found problems, 2 the
location is wrong (missing, not a checkpoint, unreadable, locked) or the arguments are,
141 the output pipe closed (``| head``), quietly. Only ``rm`` writes to storage.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Sequence

from tqdm import tqdm

from ._engine import read_metadata
from ._local_format import describe_local_directory
from ._lock import DirectoryLock
from ._metadata import METADATA_FILE, CheckpointMetadata
from ._orbax import METADATA_FILE as ORBAX_METADATA_FILE
from ._state_file import (
    STATE_FILENAME,
    CheckpointState,
    check_inside,
    delete_checkpoint,
    get_checkpoint_state,
    is_committed,
    write_checkpoint_state,
)
from ._storage import is_url, open_storage
from ._verify import chunk_count, verify
from .errors import CheckpointError, CheckpointLockedError, CorruptCheckpointError

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool a closed pipe stopped
_NUMBER = re.compile(r"-(\d+)$")


class UsageError(Exception):
    """A wrong location or argument; the message says what to do instead."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader left (`| head`, `| grep -q`): stop quietly, as Unix tools do. Point
        # stdout at /dev/null so the interpreter's last flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (UsageError, CheckpointError, OSError, ValueError) as error:
        message = str(error) if isinstance(error, UsageError) else (
            f"{type(error).__name__}: {error}")
        if args.json:
            print(json.dumps({"error": message}))
        print(f"dcheckpoint {args.command}: {message}", file=sys.stderr)
        return EXIT_USAGE


def _path_arg(path: str) -> str:
    """A command's path argument as its storage names it (a local path absolute): the
    state file records absolute paths, and ``runs/x`` or ``.`` must name the same
    checkpoints as ``/home/me/runs/x``."""
    return open_storage(path).path


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document")
    parser = argparse.ArgumentParser(
        prog="dcheckpoint", description="See and check dcheckpoint checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"dcheckpoint {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", parents=[common], help="list the checkpoints of DIR")
    ls.add_argument("directory", metavar="DIR", nargs="?")
    ls.add_argument("--local", metavar="LOCAL_DIR", action="append", default=[],
                    help="also list a local-tier directory (repeat for each host's)")
    ls.set_defaults(run=_ls)
    inspect = commands.add_parser("inspect", parents=[common],
                                  help="show the arrays of one checkpoint")
    inspect.add_argument("checkpoint", metavar="CKPT")
    inspect.set_defaults(run=_inspect)
    check = commands.add_parser("verify", parents=[common],
                                help="read every chunk back and check it (exit 1 if bad)")
    check.add_argument("checkpoint", metavar="CKPT")
    check.set_defaults(run=_verify)
    rm = commands.add_parser("rm", parents=[common],
                             help="delete one checkpoint (marker first; updates the state file)")
    rm.add_argument("checkpoint", metavar="CKPT")
    rm.set_defaults(run=_rm)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("dcheckpoint")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown (not installed)"


# -- ls ------------------------------------------------------------------------------


def _ls(args) -> int:
    if args.directory is None and not args.local:
        raise UsageError("name a checkpoint directory DIR, a --local LOCAL_DIR, or both")
    local = [_local_listing(d) for d in args.local]
    if args.directory is None:
        if args.json:
            print(json.dumps({"local": local}, indent=1))
        else:
            _print_local(local)
        return EXIT_OK
    directory = _path_arg(args.directory)
    storage = open_storage(directory)
    if is_committed(directory):
        raise UsageError(f"{directory} is itself a checkpoint; list its parent, or run "
                         f"`dcheckpoint inspect {directory}`")
    names = storage.list_dir()
    if not names and not storage.exists():
        raise UsageError(f"{directory}: no such directory")
    state = get_checkpoint_state(directory)
    found = [name for name in names if name != STATE_FILENAME
             and _inside(directory, storage.join(name)) and is_committed(storage.join(name))]
    rows = []
    for name in tqdm(found, desc="reading metadata", unit="ckpt", disable=_quiet(args)):
        meta = read_metadata(storage.join(name))
        match = _NUMBER.search(name)
        rows.append({
            "path": storage.join(name),
            "name": name,
            "number": int(match.group(1)) if match else None,
            "save_time": meta.save_time,
            "bytes": sum(a.nbytes for a in meta.arrays.values()),
            "arrays": len(meta.arrays),
            "metadata": meta.user_metadata,
            # Outside the managed list yet committed: kept for good by
            # keep_checkpoint_every_n_hours (or written by another manager or by hand).
            "kept": state is not None and storage.join(name) not in
            state.all_model_checkpoint_paths,
        })
    rows.sort(key=lambda r: (r["number"] is None, r["number"] or 0, r["save_time"], r["name"]))
    latest = _latest(rows, state)
    for row in rows:
        row["latest"] = row["path"] == latest
        row["kept"] = row["kept"] and not row["latest"]
    artifacts = _artifacts(storage, names)
    if args.json:
        print(json.dumps({"directory": directory, "latest": latest, "checkpoints": rows,
                          "artifacts": artifacts, "local": local}, indent=1))
        return EXIT_OK
    if not rows:
        print(f"{directory}: no committed checkpoints")
        _print_artifacts(artifacts)
        _print_local(local)
        return EXIT_OK
    table = [("", "NUMBER", "SAVED (UTC)", "SIZE", "ARRAYS", "NAME", "METADATA")]
    for r in rows:
        table.append(("*" if r["latest"] else "k" if r["kept"] else "",
                      "-" if r["number"] is None else str(r["number"]), _time(r["save_time"]),
                      _bytes(r["bytes"]), str(r["arrays"]), r["name"],
                      _metadata_text(r["metadata"])))
    _print_table(table)
    print("* latest" + (" (from the state file)" if state else " (most recently saved)"))
    if any(r["kept"] for r in rows):
        print("k kept outside the managed list (keep_checkpoint_every_n_hours)")
    _print_artifacts(artifacts)
    _print_local(local)
    return EXIT_OK


def _local_listing(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: no such local-tier directory")
    return {"directory": directory, "steps": describe_local_directory(directory)}


def _print_local(listings: list[dict]) -> None:
    """One table per local-tier directory: what this host holds of each step."""
    for listing in listings:
        print(f"local tier {listing['directory']}:")
        if not listing["steps"]:
            print("  no local steps")
            continue
        table = [("STEP", "STATE", "SAVED (UTC)", "OWN", "PEER COPY")]
        for r in listing["steps"]:
            copies = [f"{r[k]['pieces']} pieces, {_bytes(r[k]['bytes'])}" if r[k] else "-"
                      for k in ("own", "peer")]
            table.append((str(r["step"]), "committed" if r["committed"] else
                          "partial (never restored)",
                          _time(r["time"]) if r.get("time") else "-", *copies))
        _print_table([("  " + row[0], *row[1:]) for row in table])


def _artifacts(storage, names: list[str]) -> list[dict]:
    """ExportingCheckpointManager's committed serving artifacts (``<name>-N/manifest.json``)."""
    found = []
    for name in names:
        match = _NUMBER.search(name)
        if match and storage.exists(f"{name}/manifest.json"):
            found.append({"path": storage.join(name), "name": name,
                          "number": int(match.group(1))})
    return sorted(found, key=lambda a: (a["name"].rsplit("-", 1)[0], a["number"]))


def _print_artifacts(artifacts: list[dict]) -> None:
    if artifacts:
        print(f"exported artifacts: {', '.join(a['name'] for a in artifacts)}")


def _metadata_text(metadata: dict | None, width: int = 60) -> str:
    """The per-save metadata as compact JSON, cut to ``width`` characters."""
    if not metadata:
        return ""
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= width else text[:width - 3] + "..."


def _inside(directory: str, path: str) -> bool:
    """False (with a warning) for an entry that is a symbolic link out of ``directory``."""
    try:
        check_inside(directory, path)
    except CorruptCheckpointError as e:
        print(f"dcheckpoint ls: skipping {path}: {e}", file=sys.stderr)
        return False
    return True


def _latest(rows: list[dict], state) -> str | None:
    """The state file's latest checkpoint if committed, else the most recently saved."""
    paths = {r["path"] for r in rows}
    if state is not None and state.model_checkpoint_path in paths:
        return state.model_checkpoint_path
    return max(rows, key=lambda r: r["save_time"])["path"] if rows else None


# -- inspect -------------------------------------------------------------------------


def _inspect(args) -> int:
    path = _path_arg(args.checkpoint)
    meta = _read_checkpoint(path, orbax=True)
    arrays = [
        {
            "path": name,
            "shape": list(a.shape),
            "dtype": a.dtype.name,
            "layout": a.layout,
            "layout_text": _layout_text(a.layout),
            "chunk_shape": list(a.chunk_shape),
            "bytes": a.nbytes,
            "storage_path": a.storage_path,
            # A packed array has no directory: the packed files that hold its chunks.
            **({"packed_in": sorted({m.packed for m in meta.packed.members[name]})}
               if meta.packed and meta.packed.holds(name) else {}),
        }
        for name, a in sorted(meta.arrays.items())
    ]
    total = sum(a["bytes"] for a in arrays)
    if args.json:
        print(json.dumps({"path": path, "save_time": meta.save_time, "writer": meta.writer,
                          "bytes": total, "user_metadata": meta.user_metadata,
                          "arrays": arrays}, indent=1))
        return EXIT_OK
    by = (f"{meta.writer['process_count']} process(es)" if "process_count" in meta.writer
          else meta.writer.get("library", "an unknown writer"))
    print(f"{path}: {len(arrays)} arrays, {_bytes(total)}, saved {_time(meta.save_time)} "
          f"UTC by {by}")
    table = [("ARRAY", "SHAPE", "DTYPE", "SAVED LAYOUT", "SIZE")]
    shown: set[str] = set()
    for a in arrays:
        *groups, leaf = a["path"].split("/")
        for depth in range(len(groups)):
            group = "/".join(groups[: depth + 1])
            if group not in shown:
                shown.add(group)
                table.append(("  " * depth + groups[depth] + "/", "", "", "", ""))
        table.append(("  " * len(groups) + leaf, "x".join(map(str, a["shape"])) or "()",
                      a["dtype"], a["layout_text"], _bytes(a["bytes"])))
    _print_table(table)
    if meta.user_metadata is not None:
        print(f"metadata: {json.dumps(meta.user_metadata, sort_keys=True)}")
    return EXIT_OK


def _layout_text(layout: dict | None) -> str:
    """``[x, unsharded] on mesh x=4 y=2``, or ``host`` (from untrusted JSON: no errors)."""
    if layout is None:
        return "host"
    try:
        mesh = layout["mesh"]
        axes = " ".join(f"{n}={s}" for n, s in zip(mesh["axis_names"], mesh["shape"],
                                                  strict=True))
        specs = ", ".join(str(s) for s in layout["sharding_specs"])
        return f"[{specs}] on mesh {axes}"
    except (KeyError, TypeError, ValueError):
        return json.dumps(layout)


# -- verify --------------------------------------------------------------------------


def _verify(args) -> int:
    path = _path_arg(args.checkpoint)
    meta = _read_checkpoint(path)  # a wrong location is a usage error, not damage
    with tqdm(total=chunk_count(meta), desc="verifying", unit="chunk",
              disable=_quiet(args)) as bar:
        report = verify(path, progress=bar)
    problems = [{"array": p.array, "file": p.file, "message": p.message}
                for p in report.problems]
    if args.json:
        print(json.dumps({"path": path, "ok": report.ok,
                          "arrays_checked": report.arrays_checked,
                          "chunks_checked": report.chunks_checked,
                          "bytes_read": report.bytes_read, "problems": problems}, indent=1))
    else:
        for array, messages in report.problems_by_array().items():
            print(f"{array or '<checkpoint>'}:")
            for message in messages:
                print(f"  {message}")
        verdict = "OK" if report.ok else f"FAILED: {len(problems)} problem(s)"
        print(f"{path}: {verdict} ({report.arrays_checked} arrays, "
              f"{report.chunks_checked} chunks, {_bytes(report.bytes_read)} read)")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


# -- rm ------------------------------------------------------------------------------


def _rm(args) -> int:
    """Deletes one committed checkpoint, as ``CheckpointManager.delete`` would.

    Refuses anything without a metadata file (a directory of checkpoints, an interrupted
    save, any other directory), and a directory a live manager holds the writer lock of.
    The commit marker goes first, so a deletion cut short leaves nothing a reader takes
    for a checkpoint; then the state file drops the path (and moves "latest" back).
    """
    path = _path_arg(args.checkpoint)
    if not is_url(path) and os.path.islink(path):
        # Deleting through a link would remove the marker of a checkpoint elsewhere.
        raise UsageError(f"{path} is a symbolic link to {os.path.realpath(path)}; remove "
                         "the link itself with `rm`, or name the checkpoint it points to")
    _read_checkpoint(path)  # a UsageError that says what the location is instead
    parent = path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))
    if open_storage(parent).exists("manifest.json"):
        raise UsageError(f"{path} holds the parameters of the exported artifact {parent}; "
                         "it goes with its checkpoint (CheckpointManager.delete(step))")
    lock = None
    if not is_url(path):  # object stores have no writer lock (see docs/OBJECT_STORAGE.md)
        try:
            lock = DirectoryLock(parent).acquire()
        except CheckpointLockedError as error:
            raise UsageError(f"{error}; stop that job, or delete from it with "
                             "CheckpointManager.delete(step)") from None
    try:
        delete_checkpoint(path)
        state_updated = _forget_in_state(parent, path)
    finally:
        if lock is not None:
            lock.release()
    if args.json:
        print(json.dumps({"deleted": path, "state_file_updated": state_updated}))
    else:
        print(f"deleted {path}" + (f" and updated {STATE_FILENAME} in {parent}"
                                   if state_updated else ""))
    return EXIT_OK


def _forget_in_state(directory: str, path: str) -> bool:
    """Drops ``path`` from ``directory``'s state file; returns whether it was there."""
    state = get_checkpoint_state(directory)
    if state is None:
        return False

    def same(a: str) -> bool:
        return a == path if is_url(path) else os.path.abspath(a) == os.path.abspath(path)

    kept = [(p, t) for p, t in zip(state.all_model_checkpoint_paths,
                                   state.all_model_checkpoint_timestamps or
                                   [state.last_preserved_timestamp] * len(
                                       state.all_model_checkpoint_paths), strict=True)
            if not same(p)]
    if len(kept) == len(state.all_model_checkpoint_paths) and not same(
            state.model_checkpoint_path):
        return False
    latest = state.model_checkpoint_path
    if same(latest):
        latest = kept[-1][0] if kept else None
    if latest is None:
        open_storage(directory).remove(STATE_FILENAME)
    else:
        write_checkpoint_state(directory, CheckpointState(
            latest, tuple(p for p, _ in kept), tuple(t for _, t in kept),
            state.last_preserved_timestamp))
    return True


# -- shared --------------------------------------------------------------------------


def _read_checkpoint(path: str, *, orbax: bool = False) -> CheckpointMetadata:
    """The metadata of ``path``, or a UsageError that says where the checkpoints are.

    An Orbax checkpoint is read where ``orbax`` says the command can take one
    (``inspect``); ``verify`` and ``rm`` work on dcheckpoint's own files only.
    """
    storage = open_storage(path)
    if storage.exists(METADATA_FILE):
        return read_metadata(path)
    if storage.exists(ORBAX_METADATA_FILE):
        if orbax:
            return read_metadata(path)
        raise UsageError(f"{path} is an Orbax checkpoint: `dcheckpoint inspect` and "
                         "restore_pytree read it; this command works on dcheckpoint's own "
                         "checkpoints (restore it and save it with dcheckpoint to migrate)")
    if not storage.exists():
        raise UsageError(f"{path}: no such checkpoint (nothing exists there)")
    committed = [storage.join(n) for n in storage.list_dir() if is_committed(storage.join(n))]
    if committed:
        state = get_checkpoint_state(path)
        latest = state.model_checkpoint_path if state else committed[-1]
        raise UsageError(f"{path} is a directory of {len(committed)} checkpoint(s), not a "
                         f"checkpoint; try {latest} (see `dcheckpoint ls {path}`)")
    raise UsageError(f"{path} is not a committed checkpoint: it has no {METADATA_FILE} "
                     "(an incomplete or interrupted save, or not a dcheckpoint directory)")


def _quiet(args) -> bool:
    """Progress bars only for people: not with --json, not when stderr is redirected."""
    return args.json or not sys.stderr.isatty()


def _time(seconds: float) -> str:
    stamp = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def _bytes(count: int) -> str:
    """``512 B``, ``1.5 KiB``, ... ``3.0 TiB``."""
    size, unit = float(count), 0
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{count} B" if unit == 0 else f"{size:.1f} {units[unit]}"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
