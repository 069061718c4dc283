"""Exceptions that map onto per-request errors of the serving frameworks."""


class InvalidInputError(ValueError):
    """A request's input is malformed; only that request fails (INVALID_ARG / HTTP 400)."""

    http_status = 400


class UnsupportedMediaTypeError(InvalidInputError):
    """A request's body comes in a content type the endpoint does not take (HTTP 415)."""

    http_status = 415


class ModelFilesError(FileNotFoundError):
    """A model directory or one of its files is missing or unreadable."""


class ConfigError(ValueError):
    """A stage configuration value is missing or invalid."""
