"""Errors a user can meet. Each carries a one-line message naming the file, line or field."""


class UserError(Exception):
    """Base class: the CLI prints the message as one line and exits 1, without a traceback."""


class MissingExtra(UserError):
    """A verb whose optional dependencies are not installed."""


def require(module: str, extra: str) -> None:
    """One clear line instead of an ImportError when an optional part is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(
            f"this needs {module}, which is not installed: pip install 'loraforge[{extra}]'"
        )
