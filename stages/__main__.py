"""`python -m stages <name>`: the same commands as the `remote` console script."""

from stages.cli import app

app()
