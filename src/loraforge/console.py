"""One rich console for the whole package, so progress bars and messages do not interleave."""

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
