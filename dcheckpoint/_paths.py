"""Array names: the logical path users read and the storage path files live at.

One rule, applied once, for both APIs (``Checkpoint`` and ``save_pytree``):

- A **logical path** joins the user's key names with ``/`` (``model/dense/kernel``).
  Each key is kept as written except for what would make the path ambiguous: ``%``
  becomes ``%25``, ``/`` becomes ``%2F`` and the empty key becomes ``%00`` (``escape``).
  Logical paths are the metadata's array names and the object graph's child names.
- A **storage path** is where the array's Zarr directory is, relative to the
  checkpoint. ``storage_paths`` derives it from the logical path once, at save time,
  and metadata records it, so readers never recompute it (and a later change of this
  rule cannot misplace an old array). A component that is a plain, short name is kept;
  anything else becomes a readable ASCII prefix, ``--`` and 16 hex digits of the
  component's SHA-256 (``sp ace`` -> ``sp_ace--4e0ad5cbd2e0eb06``), so every
  component fits a file system's 255-byte name limit whatever the key.

Because metadata may come from an untrusted checkpoint, every storage path is checked
on read as well as on write (``check_storage_path``): nothing in metadata may point
outside the checkpoint directory.
"""

from __future__ import annotations

import collections
import hashlib
import re
import unicodedata
from collections.abc import Iterable

from .errors import CorruptCheckpointError

__all__ = [
    "escape",
    "unescape",
    "split_path",
    "storage_paths",
    "to_storage_path",
    "check_storage_path",
    "join_path",
]

# Names that are plain on every file system and object store and that Zarr v3 accepts
# as node names (which must not start with "__"): no leading "." (hidden files, "." and
# ".."), no leading "-" (read as an option by command-line tools).
_ALPHABET = "A-Za-z0-9_.\\-"
_PLAIN_COMPONENT = re.compile(rf"^(?![_]{{2}})(?![.\-])[{_ALPHABET}]{{1,100}}$")
# A hashed component ends like this; a plain-looking key that does too is hashed itself,
# so a plain name can never equal another key's hashed name.
_HASHED_SUFFIX = re.compile(r"--[0-9a-f]{16}$")
# Names this format writes inside a checkpoint's directories.
_RESERVED = frozenset({"zarr.json", "dcheckpoint.json"})
# What a reader accepts: plain or hashed names, up to the 255-byte limit of file names.
_STORED_COMPONENT = re.compile(rf"^(?![_]{{2}})(?![.\-])[{_ALPHABET}]{{1,255}}$")
_MAX_DEPTH = 64
_PREFIX_CHARS = 40
_ESCAPES = {"%": "%25", "/": "%2F"}
_EMPTY = "%00"


def escape(name) -> str:
    """One logical path component for the key ``name`` (``str(name)`` unless escaped)."""
    name = str(name)
    if not name:
        return _EMPTY
    return name.replace("%", "%25").replace("/", "%2F")


def unescape(component: str) -> str:
    """The key name a logical path component stands for (inverse of ``escape``)."""
    if component == _EMPTY:
        return ""
    return re.sub("%(25|2F)", lambda m: "%" if m.group(1) == "25" else "/", component)


def join_path(keys: Iterable) -> str:
    """Joins key names into a logical path: ``["a/b", "c"]`` -> ``"a%2Fb/c"``."""
    return "/".join(escape(k) for k in keys)


def split_path(logical_path: str) -> list[str]:
    """The key names of a logical path (inverse of ``join_path``)."""
    return [unescape(c) for c in logical_path.split("/")]


def _components(logical_path: object) -> list[str]:
    if not isinstance(logical_path, str) or not logical_path:
        raise ValueError(f"Array path must be a non-empty string, got {logical_path!r}")
    components = logical_path.split("/")
    if any(not c for c in components):
        raise ValueError(f"Array path {logical_path!r} has an empty component")
    if len(components) > _MAX_DEPTH:
        raise ValueError(f"Array path {logical_path!r} is deeper than {_MAX_DEPTH} levels")
    return components


def _is_plain(component: str) -> bool:
    return (
        _PLAIN_COMPONENT.match(component) is not None
        and not _HASHED_SUFFIX.search(component)
        and component.lower() not in _RESERVED
    )


def _hashed(component: str) -> str:
    """``<readable ASCII prefix>--<16 hex digits of SHA-256>`` for any component."""
    folded = unicodedata.normalize("NFKD", unescape(component))
    ascii_only = "".join(c for c in folded if not unicodedata.combining(c))
    prefix = re.sub(f"[^{_ALPHABET}]+", "_", ascii_only).lstrip("._-")[:_PREFIX_CHARS]
    digest = hashlib.sha256(component.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{prefix or 'k'}--{digest}"


def _encode_component(component: str) -> str:
    return component if _is_plain(component) else _hashed(component)


def to_storage_path(logical_path: str) -> str:
    """The storage path of one logical path, component by component ("a/b" -> "a/b").

    ``storage_paths`` is what a save uses: it also separates names that differ only
    in case. This is its per-path part, and checks the logical path.

    Raises:
      ValueError: the path is empty, has an empty component or is too deep.
    """
    return "/".join(_encode_component(c) for c in _components(logical_path))


def storage_paths(logical_paths: Iterable[str]) -> dict[str, str]:
    """The storage path of every array of one save: ``{logical path: storage path}``.

    Sibling keys that differ only in case (``W`` and ``w``) would share one directory
    on a case-insensitive file system (macOS, Windows, some network shares), so all of
    them get hashed names, which differ in their digests.

    Raises:
      ValueError: a logical path is malformed, or two storage paths still coincide
        ignoring case (a 64-bit digest collision).
    """
    split = {path: _components(path) for path in logical_paths}
    siblings: dict[tuple[str, ...], set[str]] = collections.defaultdict(set)
    for components in split.values():
        for i, component in enumerate(components):
            siblings[tuple(components[:i])].add(component)
    clashing: set[tuple[tuple[str, ...], str]] = set()
    for parent, names in siblings.items():
        by_fold = collections.defaultdict(list)
        for name in names:
            by_fold[_encode_component(name).casefold()].append(name)
        clashing.update((parent, n) for group in by_fold.values() if len(group) > 1
                        for n in group)
    result = {}
    for path, components in split.items():
        result[path] = "/".join(
            _hashed(c) if (tuple(components[:i]), c) in clashing else _encode_component(c)
            for i, c in enumerate(components)
        )
    seen: dict[str, str] = {}
    for path, stored in result.items():
        other = seen.setdefault(stored.casefold(), path)
        if other != path:
            raise ValueError(
                f"Arrays {other!r} and {path!r} map to the same storage path {stored!r}"
            )
    return result


def check_storage_path(storage_path: object, *, array: str) -> str:
    """Validates a storage path read from metadata; returns it.

    Raises:
      CorruptCheckpointError: the path is absolute, contains "..", "." or empty
        components, names longer than 255 bytes, reserved names or characters that no
        writer of this format produces.
    """
    if not isinstance(storage_path, str) or not storage_path:
        raise CorruptCheckpointError(
            f"Array {array!r}: storage path must be a non-empty string, found {storage_path!r}"
        )
    components = storage_path.split("/")
    for component in components:
        if not _STORED_COMPONENT.match(component) or component.lower() in _RESERVED:
            raise CorruptCheckpointError(
                f"Array {array!r}: storage path {storage_path!r} would leave the "
                f"checkpoint directory or is malformed (component {component!r})"
            )
    if len(components) > _MAX_DEPTH:
        raise CorruptCheckpointError(
            f"Array {array!r}: storage path {storage_path!r} is deeper than {_MAX_DEPTH}"
        )
    return storage_path
