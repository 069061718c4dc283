"""Exceptions that map onto per-request errors of the serving frameworks."""


class InvalidInputError(ValueError):
    """A request's input is malformed; only that request fails (INVALID_ARG / HTTP 400)."""


class ModelFilesError(FileNotFoundError):
    """A model directory or one of its files is missing or unreadable."""


class ConfigError(ValueError):
    """A stage configuration value is missing or invalid."""
