"""One rich console for the whole package, so progress bars and messages do not interleave."""

from rich.console import Console

console = Console(highlight=False)
# soft_wrap: an error stays one line (the terminal wraps it), greppable in logs
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def count_progress(enabled: bool = True):
    """A 'description, bar, n/total, time left' progress bar on stderr (batch verbs)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not enabled,
    )
