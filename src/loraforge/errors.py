"""Errors a user can meet. Each carries a one-line message naming the file, line or field."""


class UserError(Exception):
    """Base class: the CLI prints the message as one line and exits 1, without a traceback."""
