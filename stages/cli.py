"""One Typer command per pipeline stage (the first, `check`, validates the params), plus
`predict`, `preset` and `compare`.

Each stage module keeps heavy imports (torch, transformers) inside its function, so `--help` is fast.
"""

from __future__ import annotations

import inspect

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


def reflowed(doc: str | None) -> str:
    """A docstring as help text: each paragraph's wrapped lines joined into one, so the terminal
    wraps them (Typer's rich help keeps the source's line breaks and wraps again, leaving short
    ragged lines). An indented line, such as an example command, keeps a line of its own."""
    paragraphs = []
    for paragraph in inspect.cleandoc(doc or "").split("\n\n"):
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and not line.startswith(" ") and not lines[-1].startswith(" "):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


for _name, _module in [
    ("check", check),
    ("download", download),
    ("depth", depth),
    ("caption", caption),
    ("features", features),
    ("train", train),
    ("evaluate", evaluate),
    ("predict", predict),
    ("preset", preset),
    ("compare", compare),
]:
    app.command(_name, help=reflowed(_module.main.__doc__))(_module.main)
