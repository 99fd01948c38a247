"""``python -m clara.cli …``: the library's commands (what torchrun launches, one process per GPU)."""

from clara.cli import app, run_app

run_app(app)
