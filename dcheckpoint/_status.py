"""The load status returned by ``Checkpoint.restore``/``read`` (TF's ``CheckpointLoadStatus``).

The status is live: a value restored later by deferred restoration (an object attached
after ``restore``) counts as consumed from then on, so ``assert_consumed()`` can pass once
the model is fully built, exactly as in TensorFlow.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

from dcheckpoint.errors import CheckpointError

__all__ = ["CheckpointAssertionError", "CheckpointLoadStatus", "InitializationOnlyStatus"]

SAVE_COUNTER = "save_counter"
"""The root child a Checkpoint saves its save counter under (reserved, never a user name)."""


class CheckpointAssertionError(CheckpointError, AssertionError):
    """A load-status assertion failed; TF raises ``AssertionError`` here, so this is one."""


@dataclasses.dataclass
class MatchState:
    """What one restore matched; shared by the status, its deferred restores and finalizer.

    Attributes:
      checkpoint_paths: every array path stored in the checkpoint.
      consumed: checkpoint paths that were assigned to an object.
      unmatched_objects: paths of current leaves no checkpoint value was found for.
      save_path: the checkpoint restored from, for messages.
      partial: ``expect_partial()`` was called: no warning about unused values.
    """

    checkpoint_paths: frozenset[str]
    save_path: str
    consumed: set[str] = dataclasses.field(default_factory=set)
    unmatched_objects: set[str] = dataclasses.field(default_factory=set)
    partial: bool = False

    def unused(self) -> list[str]:
        """Checkpoint values not (yet) assigned to any object, sorted."""
        return sorted(self.checkpoint_paths - self.consumed)


def _warn_unused(state: MatchState) -> None:
    # Runs when the status is garbage collected, as TF warns from its __del__: values
    # nobody restored usually mean a typo in an attribute name or a changed model.
    unused = state.unused()
    if unused and not state.partial:
        warnings.warn(
            f"Checkpoint {state.save_path!r}: {len(unused)} value(s) were never restored: "
            f"{unused[:20]}. Call expect_partial() on the load status if this is intended.",
            stacklevel=2,
        )


class CheckpointLoadStatus:
    """What a restore matched, with TensorFlow's assertions on it.

    Every assertion returns the status (so they chain) or raises
    ``CheckpointAssertionError`` (an ``AssertionError`` and a ``CheckpointError``)
    listing the unmatched paths.
    """

    def __init__(self, state: MatchState):
        self._state = state
        weakref.finalize(self, _warn_unused, state)

    def assert_consumed(self) -> CheckpointLoadStatus:
        """Every checkpoint value was restored and every current object got a value.

        Raises:
          CheckpointAssertionError: naming the unused values and the unmatched objects.
        """
        unused = self._state.unused()
        unmatched = sorted(self._state.unmatched_objects)
        if unused or unmatched:
            raise CheckpointAssertionError(
                f"Checkpoint {self._state.save_path!r} was not fully consumed. "
                f"Unused checkpoint values (no object, or not attached yet): {unused}. "
                f"Objects with no value in the checkpoint: {unmatched}."
            )
        return self

    def assert_existing_objects_matched(self) -> CheckpointLoadStatus:
        """Every object that existed at restore time got a value from the checkpoint.

        Raises:
          CheckpointAssertionError: naming the objects with no value.
        """
        unmatched = sorted(self._state.unmatched_objects)
        if unmatched:
            raise CheckpointAssertionError(
                f"Objects with no value in checkpoint {self._state.save_path!r}: {unmatched}"
            )
        return self

    def assert_nontrivial_match(self) -> CheckpointLoadStatus:
        """At least one value other than ``save_counter`` was restored.

        Raises:
          CheckpointAssertionError: nothing but (at most) the save counter matched.
        """
        if not (self._state.consumed - {SAVE_COUNTER}):
            raise CheckpointAssertionError(
                f"Nothing except the save counter was restored from checkpoint "
                f"{self._state.save_path!r}; checkpoint values: "
                f"{sorted(self._state.checkpoint_paths)}"
            )
        return self

    def expect_partial(self) -> CheckpointLoadStatus:
        """Silences the warning about checkpoint values that are never restored."""
        self._state.partial = True
        return self

    def run_restore_ops(self, session=None) -> None:
        """TF's graph-mode call; restores here happen at once, so it does nothing."""
        del session

    def initialize_or_restore(self, session=None) -> None:
        """TF's graph-mode call; restores here happen at once, so it does nothing."""
        del session

    def __repr__(self) -> str:
        return (
            f"CheckpointLoadStatus(save_path={self._state.save_path!r}, "
            f"unused={len(self._state.unused())}, "
            f"unmatched_objects={len(self._state.unmatched_objects)})"
        )


class InitializationOnlyStatus:
    """The status of ``restore(None)``: nothing was restored, as TF's status of that name.

    As in TensorFlow the assertions always fail (there was nothing to match), and
    ``expect_partial()`` returns the status; nothing is touched and nothing warns.
    """

    _MESSAGE = "No checkpoint specified (save_path=None); nothing is being restored."

    def assert_consumed(self) -> InitializationOnlyStatus:
        """Always fails: no checkpoint was given."""
        raise CheckpointAssertionError(self._MESSAGE)

    def assert_existing_objects_matched(self) -> InitializationOnlyStatus:
        """Always fails: no checkpoint was given."""
        raise CheckpointAssertionError(self._MESSAGE)

    def assert_nontrivial_match(self) -> InitializationOnlyStatus:
        """Always fails: no checkpoint was given."""
        raise CheckpointAssertionError(self._MESSAGE)

    def expect_partial(self) -> InitializationOnlyStatus:
        """Does nothing; returns the status."""
        return self

    def run_restore_ops(self, session=None) -> None:
        """Does nothing: there is nothing to restore (TF's eager no-op)."""
        del session

    def initialize_or_restore(self, session=None) -> None:
        """Does nothing: variables are initialised when created (TF's eager no-op)."""
        del session
