"""Errors that reach the user as one readable line and an exit code."""


class OnnxoptError(Exception):
    """Base class: the message is shown as is; `exit_code` is what the CLI returns."""

    exit_code = 2


class InputError(OnnxoptError):
    """Bad input: a model, data file, option or path that cannot be used (exit 2)."""

    exit_code = 2


class ValidationError(OnnxoptError):
    """A step produced a model that fails the checker, the interface check or a tolerance (exit 1)."""

    exit_code = 1
