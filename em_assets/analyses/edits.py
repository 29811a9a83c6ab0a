"""Edits that turn an organism's model into a variant for a sweep point (no torch at import time).

An edit is a frozen dataclass, so it pickles into sampling worker processes (which rebuild the model and apply it
there) and its fields describe it for the point's setting hash and table rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelEdit:
    """A change applied in place to a loaded (adapter-merged) model before sampling."""

    def apply(self, model) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement apply(model)")

    def describe(self) -> dict:
        """JSON-able identity: the class name and every field; it goes into the setting hash."""
        return {"edit": type(self).__name__, **asdict(self)}
