"""Operator knobs read from environment variables, each checked the same way."""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["number_from_env"]


def number_from_env(name: str, default, *, valid: Callable[[float], bool], expected: str,
                    parse: Callable[[str], float] = float):
    """The value of variable ``name`` (``default`` when unset or empty).

    Raises:
      ValueError: the variable is set but does not ``parse`` or is not ``valid``; the
        message names the variable, its value and what was ``expected``.
    """
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{name}={text!r}: expected {expected}")
    return value
