"""Where a saved array's files are, for tests that look at or damage them.

Each save keeps its arrays under its own data directory (``data-<save id>/``, see
docs/FORMAT.md), named in the metadata's storage paths; tests find them there rather
than spelling the layout out.
"""

from __future__ import annotations

from pathlib import Path

from dcheckpoint import read_metadata

__all__ = ["array_dir"]


def array_dir(checkpoint, array: str) -> Path:
    """The directory of the Zarr array saved as ``array`` in ``checkpoint``."""
    return Path(checkpoint) / read_metadata(str(checkpoint)).arrays[array].storage_path
