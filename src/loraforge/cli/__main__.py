"""`python -m loraforge.cli`: the same command as `loraforge`."""

from loraforge.cli import app

app(prog_name="loraforge")
