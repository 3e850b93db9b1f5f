"""One rich console for the whole package, so progress bars and messages do not interleave."""

from rich.console import Console

# soft_wrap: a line stays one line (the terminal wraps it, not rich), greppable in logs; a
# figure like "100% ended with EOS" is never cut in two at the console's width
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def say(line: str) -> None:
    """Print a line of data (file names, record text) as it is: no rich markup in it."""
    console.print(line, markup=False)


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


def quiet_libraries() -> None:
    """What a user of the CLI reads is loraforge's output: no "Loading weights" bars from
    transformers nor deprecation notices from the libraries under it (they are for developers,
    who see them in tests). Called once by the CLI entry point, never by library code: an
    application may set up its own process, a library may not."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for lib in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=lib)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=lib)
        warnings.filterwarnings("ignore", category=UserWarning, module=lib)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # PEFT imports bitsandbytes when it is installed (the qlora extra); its CPU backend then logs
    # "Failed to load CPU gemm_4bit_forward from kernels-community" on every verb's start
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import sys

    if "transformers" in sys.modules:  # imported already: its settings were read at import
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
