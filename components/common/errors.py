"""Errors that the CLI turns into one clear line and a non-zero exit."""
from __future__ import annotations


class ClipmillError(Exception):
    """An error a user can act on; its message is printed alone, without a traceback."""


class ConfigError(ClipmillError):
    """params.yaml is malformed: unknown key, wrong type or out-of-range value."""


class InputError(ClipmillError):
    """A stage input is unusable. The message names the file, the field (if any) and the reason."""

    def __init__(self, file: object, reason: str, field: str | None = None):
        self.file, self.field, self.reason = str(file), field, reason
        where = f"{self.file}: field '{field}'" if field else self.file
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # raised in a worker process, re-raised in the driver
        return type(self), (self.file, self.reason, self.field)
