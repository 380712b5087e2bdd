"""The `predict` command: label new (text, image, entity pair) inputs with a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import reported_errors, setup_logging, writing_outputs


def main(
    input: Annotated[Path, typer.Option("--input", help="Input JSONL (its format: above).")],
    output: Annotated[Path, typer.Option(help="Output JSONL, one line per input line.")],
    model: Annotated[Path, typer.Option(help="Trained model folder, e.g. models/best.")],
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 64,
) -> None:
    """Label each input line; write {"line", "id", "label", "probabilities"} per line.

    An input line has "text_tokens" (a list) or "text" (split on whitespace); "image" (a path
    relative to the input file); "head" and "tail", each {"span": \\[start, end]} over the tokens
    or {"box": \\[x1, y1, x2, y2]} in \\[0, 1]; optional "objects" (more boxes), "head_caption",
    "tail_caption", "depth" (a .npy map) and "id". Details: pipeline/predict.py.
    """
    setup_logging()
    from pipeline.predict import predict_file

    with reported_errors(), writing_outputs(output):
        results = predict_file(model, input, output, batch_size)
    typer.echo(f"predict: labelled {len(results)} inputs -> {output}")
