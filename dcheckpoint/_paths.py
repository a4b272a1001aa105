"""Logical array paths and their safe storage paths inside a checkpoint.

A logical path is the object-graph path users read (``model/dense/kernel``). Each
component becomes one directory name on disk. Because metadata may come from an
untrusted checkpoint, every storage path is checked on read as well as on write:
nothing in metadata may point outside the checkpoint directory.
"""

from __future__ import annotations

import re
import urllib.parse

from .errors import CorruptCheckpointError

__all__ = ["to_storage_path", "check_storage_path", "join_path"]

# Directory names that are plain on every filesystem and object store and that Zarr v3
# accepts as node names (which must not start with "__").
_PLAIN_COMPONENT = re.compile(r"^(?!__)(?!\.)[A-Za-z0-9_.\-]{1,200}$")
# What _encode_component can produce: plain names or percent-encoded ones; never "",
# ".", "..", a leading "." (so no hidden files) or a leading "__" (reserved by Zarr).
_STORED_COMPONENT = re.compile(r"^(?!__)(?!\.)[A-Za-z0-9_.\-%]{1,600}$")
_MAX_DEPTH = 64


def _encode_component(component: str) -> str:
    if _PLAIN_COMPONENT.match(component):
        return component
    # Percent-encode everything else (including "/", "..", a leading "." or "__"), so
    # the mapping stays one-to-one and the result is one plain directory name.
    encoded = urllib.parse.quote(component, safe="")
    encoded = encoded.replace(".", "%2E").replace("_", "%5F")
    return encoded


def to_storage_path(logical_path: str) -> str:
    """Returns the relative storage path of ``logical_path`` ("a/b" -> "a/b").

    Raises:
      ValueError: the path is empty or has an empty component.
    """
    if not isinstance(logical_path, str) or not logical_path:
        raise ValueError(f"Array path must be a non-empty string, got {logical_path!r}")
    components = logical_path.split("/")
    if any(not c for c in components):
        raise ValueError(f"Array path {logical_path!r} has an empty component")
    if len(components) > _MAX_DEPTH:
        raise ValueError(f"Array path {logical_path!r} is deeper than {_MAX_DEPTH} levels")
    return "/".join(_encode_component(c) for c in components)


def check_storage_path(storage_path: object, *, array: str) -> str:
    """Validates a storage path read from metadata; returns it.

    Raises:
      CorruptCheckpointError: the path is absolute, contains "..", "." or empty
        components, or characters that no writer of this format produces.
    """
    if not isinstance(storage_path, str) or not storage_path:
        raise CorruptCheckpointError(
            f"Array {array!r}: storage path must be a non-empty string, found {storage_path!r}"
        )
    components = storage_path.split("/")
    for component in components:
        if not _STORED_COMPONENT.match(component):
            raise CorruptCheckpointError(
                f"Array {array!r}: storage path {storage_path!r} would leave the "
                f"checkpoint directory or is malformed (component {component!r})"
            )
    if len(components) > _MAX_DEPTH:
        raise CorruptCheckpointError(
            f"Array {array!r}: storage path {storage_path!r} is deeper than {_MAX_DEPTH}"
        )
    return storage_path


def join_path(keys) -> str:
    """Joins object-graph keys into a logical path, escaping "/" and "%" in each key.

    The escape keeps the mapping one-to-one: dict keys {"a/b"} and {"a": {"b"}} get
    different paths ("a%2Fb" and "a/b").
    """
    return "/".join(str(k).replace("%", "%25").replace("/", "%2F") for k in keys)
