"""Errors the stages raise about what the store holds."""


class MissingUpstreamError(RuntimeError):
    """A stage ran before the stage it reads from."""
