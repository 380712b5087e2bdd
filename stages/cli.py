"""One Typer command per pipeline stage (the first, `check`, validates the params), plus
`predict`, `preset` and `compare`.

Each stage module keeps heavy imports (torch, transformers) inside its function, so `--help` is fast.
"""

from __future__ import annotations

import typer

from stages import (
    caption,
    check,
    compare,
    depth,
    download,
    evaluate,
    features,
    predict,
    preset,
    train,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="REMOTE pipeline stages: check -> download -> depth -> caption -> features -> train -> evaluate.",
)


@app.callback()
def _process_setup() -> None:
    """Before any command: glibc keeps freed memory for reuse (``REMOTE_SYSTEM_MALLOC=1`` opts
    out; pipeline.device.keep_freed_memory)."""
    from pipeline.device import keep_freed_memory

    keep_freed_memory()


app.command("check")(check.main)
app.command("download")(download.main)
app.command("depth")(depth.main)
app.command("caption")(caption.main)
app.command("features")(features.main)
app.command("train")(train.main)
app.command("evaluate")(evaluate.main)
app.command("predict")(predict.main)
app.command("preset")(preset.main)
app.command("compare")(compare.main)
