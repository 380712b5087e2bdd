"""The model card (``README.md`` of a model folder): what a reader of the Hub page needs.

:func:`model_card` writes the Hub metadata header (library, license, tags, the test micro-F1 as a
``model-index`` result) and sections: the dataset and its manifest's hash, the test metrics with
per-pair-kind F1, the dev selection, the params that matter, the fidelity switches against the
paper preset, intended use, and the commands that reproduce, load and publish the model.
``train`` writes a card without test metrics; ``evaluate`` rewrites it with them.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from pipeline.config import Params, flatten, params_to_dict
from pipeline.presets import apply_preset

__all__ = ["CARD_FILE", "KEY_PARAMS", "FIDELITY_SWITCHES", "model_card"]

CARD_FILE = "README.md"

KEY_PARAMS = (
    "data.source", "model.text_model", "model.vision_model", "model.pretrained",
    "data.max_seq", "data.max_objects", "data.use_depth", "data.use_box", "data.use_caption",
    "caption.backend", "depth.source", "model.ot.enabled", "model.ot.epsilon",
    "model.ot.iterations", "model.moe.enabled", "train.seed", "train.epochs",
    "train.batch_size", "train.num_processes", "train.grad_accum", "train.lr", "train.threads",
)  # fmt: skip
# The README's fidelity switches ("Fidelity to the original code": its fidelity table's rows, and
# model.ot.solver from the table above it): each deliberate deviation from the original is one.
FIDELITY_SWITCHES = (
    "model.ot.kernel_floor", "model.ot.barycentric", "model.ot.mode", "model.ot.clamp",
    "model.ot.solver", "model.init", "model.depth_embedding", "features.crop_resize",
    "features.depth_scale", "data.pad_to_max", "model.head.project_without_caption",
    "train.decay_norms_and_biases", "train.max_grad_norm", "train.mixed_precision", "train.tf32",
    "train.optimize", "train.report_test_each_epoch",
)  # fmt: skip
PAIR_KIND_ORDER = ("text-text", "text-object", "object-object")


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _metadata(params: Params, test: dict[str, Any] | None) -> str:
    results = None
    if test is not None and test.get("micro_f1") is not None:
        results = [
            EvalResult(
                task_type="text-classification",
                task_name="Multimodal relation extraction",
                dataset_type=params.data.source,
                dataset_name=params.data.source,
                dataset_split="test",
                metric_type="f1",
                metric_name="micro-F1",
                metric_value=round(test["micro_f1"], 4),
            )
        ]
    data = ModelCardData(
        library_name="remote-pipeline",
        license="mit",
        pipeline_tag="text-classification",
        tags=["relation-extraction", "multimodal", "optimal-transport", "remote"],
        metrics=["f1"],
        model_name=f"remote-{params.data.source}",
        eval_results=results,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(
    params: Params,
    labels: list[str],
    info: dict[str, Any],
    test: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
) -> str:
    """The card's Markdown. ``info``: the training info (``epoch``, ``dev`` metrics);
    ``test``: ``metrics/test.json``'s content; ``dataset``: ``{"source", "manifest_sha256",
    "splits"}`` of the dataset it was scored on (both None before evaluation)."""
    flat = flatten(params_to_dict(params))
    paper = flatten(params_to_dict(apply_preset(params, "paper")))
    lines = [
        _metadata(params, test),
        f"# REMOTE relation classifier ({params.data.source})",
        "",
        "REMOTE (ACM MM 2025) predicts the relation of an entity pair, each a text span or an "
        "object in the image, from a text and its image. Trained with `remote-pipeline` on "
        f"`{params.data.source}`, with `{params.model.text_model}` (text) and "
        f"`{params.model.vision_model}` (vision), {len(labels)} relation labels.",
        "",
        "## Data",
        "",
    ]
    if dataset is not None:
        splits = ", ".join(f"{name} {count}" for name, count in dataset["splits"].items())
        lines += [
            f"- dataset: `{dataset['source']}` ({splits} records)",
            f"- `manifest.json` sha256: `{dataset['manifest_sha256']}`",
        ]
    else:
        lines.append(f"- dataset: `{params.data.source}` (manifest hash: added by `evaluate`)")
    lines += [f"- labels: {', '.join(f'`{label}`' for label in labels)}", "", "## Results", ""]
    if test is None:
        lines.append("Not scored on test yet: the `evaluate` stage rewrites this card with them.")
    else:
        lines += [
            "Test split, scored once on the checkpoint selected on dev:",
            "",
            "| metric | value |",
            "|---|---|",
            f"| micro-F1 | {_number(test['micro_f1'])} |",
            f"| micro precision | {_number(test['micro_precision'])} |",
            f"| micro recall | {_number(test['micro_recall'])} |",
            f"| accuracy | {_number(test['accuracy'])} |",
            f"| macro-F1 | {_number(test['macro_f1'])} |",
            "",
            "| pair kind | micro-F1 | support |",
            "|---|---|---|",
        ]
        kinds = test.get("by_pair_kind", {})
        for kind in (*PAIR_KIND_ORDER, *sorted(set(kinds) - set(PAIR_KIND_ORDER))):
            if kind in kinds:
                row = kinds[kind]
                lines.append(f"| {kind} | {_number(row['micro_f1'])} | {row['support']} |")
    dev = info.get("dev", {})
    lines += [
        "",
        f"Selected at epoch {info.get('epoch')} of {params.train.epochs} on dev micro-F1 "
        f"{_number(dev.get('micro_f1'))}.",
        "",
        "## Params that matter",
        "",
        "| param | value |",
        "|---|---|",
        *(f"| `{key}` | `{flat[key]}` |" for key in KEY_PARAMS),
        "",
        "All params are in `trained.json`.",
        "",
        "## Fidelity switches",
        "",
        "Each deliberate deviation from the original code is a param; the paper preset sets the",
        "original's behaviour (see the remote-pipeline README's fidelity table).",
        "",
        "| param | this model | paper preset |",
        "|---|---|---|",
        *(
            f"| `{key}` | `{flat[key]}` | `{paper[key]}`{'' if flat[key] == paper[key] else ' ≠'} |"
            for key in FIDELITY_SWITCHES
        ),
        "",
        "## Intended use",
        "",
        "Research on multimodal relation extraction: reproducing and ablating REMOTE. Labels are "
        "the training dataset's; inputs unlike it (other languages, other image domains) are out "
        "of scope. A model trained on the embedded synthetic dataset with `tiny` towers only "
        "checks that the pipeline learns; it knows nothing about real posts.",
        "",
        "## Reproduce",
        "",
        "`trained.json` holds every param. In a clone of remote-pipeline, with this folder at",
        "`path/to/model`, `preset` turns them into the flags that differ from the clone's",
        "`params.yaml`, and the experiment retrains the model (same code, machine kind, threads",
        "and library versions: the same weights):",
        "",
        "```bash",
        "make setup && dvc exp run $(.venv/bin/python -m stages preset path/to/model)",
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from pipeline.model.saved import load_trained  # or RemoteModel.from_pretrained(folder)",
        'trained = load_trained("models/best")  # a folder or a Hub id',
        "```",
        "",
        "`python -m stages predict --model models/best --input inputs.jsonl --output out.jsonl`",
        "labels new inputs. Publish the folder with `hf upload <user>/<name> models/best`.",
        "",
    ]
    return "\n".join(lines)
