"""Two writers of one file at once, made to overlap: each renames its temporary file into place only once both have
written theirs, the interleaving that breaks a temporary name the two share."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest


def written_twice_at_once(monkeypatch: pytest.MonkeyPatch, write: Callable[[], object]) -> list:
    """Run `write` in two threads whose renames (Path.replace) wait for each other; what each returned (the
    first error either raised, raised here)."""
    both_written = threading.Barrier(2, timeout=30)
    rename = Path.replace

    def replace_when_both_have_written(self, target):
        both_written.wait()
        return rename(self, target)

    monkeypatch.setattr(Path, "replace", replace_when_both_have_written)
    results: list = []
    errors: list[BaseException] = []

    def one_writer() -> None:
        try:
            results.append(write())
        except BaseException as exc:  # a thread's exception would otherwise be printed, not raised
            errors.append(exc)

    writers = [threading.Thread(target=one_writer) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    if errors:
        raise errors[0]
    return results
