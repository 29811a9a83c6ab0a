"""Bad input: the errors a command reports as one message with exit status 2."""

from __future__ import annotations


class StoreError(Exception):
    """A results store a command cannot use: missing where it must exist, or not one DuckDB can open."""


class ForgetError(Exception):
    """Organisms that cannot be forgotten: still in the grid, unknown, or a store without snapshots unconfirmed."""


def bad_input_message(exc: BaseException) -> str | None:
    """The message of a bad-input error anywhere in the chain (Dagster wraps errors raised inside steps)."""
    from em_assets.catalog.parsing import DatasetError
    from em_assets.catalog.reference import ReferenceFileError
    from em_assets.catalog.upstream import ChecksumError, MirrorError
    from em_assets.grid.load import GridError
    from em_assets.judging.http import JudgeAuthError, JudgeCheckError
    from em_assets.settings import SettingsError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        # ModelLoadError by name: importing its module loads torch, too slow for every error path.
        bad = (
            GridError
            | DatasetError
            | ReferenceFileError
            | ChecksumError
            | MirrorError
            | SettingsError
            | JudgeAuthError
            | JudgeCheckError
            | StoreError
            | ForgetError
        )
        if isinstance(err, bad) or (type(err).__name__ == "ModelLoadError"):
            return str(err)
        todo += [err.__cause__, err.__context__, getattr(err, "user_exception", None)]
    return None
