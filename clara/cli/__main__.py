"""``python -m clara.cli …``: the library's commands (what torchrun launches, one process per GPU)."""

from clara.cli import app, quiet_libraries

quiet_libraries()
app()
