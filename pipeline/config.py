"""Typed parameters, loaded once from ``params.yaml`` and passed down.

Every section is a frozen dataclass. Loading is strict: an unknown key, a missing key, a key given
twice, a value of the wrong type or outside its range (:data:`RANGES`) fails with a
:class:`ParamsError` naming the key path and what was expected. The
dataclasses have no defaults: ``params.yaml`` is the one home of every default, and code that needs
the shipped configuration (tests, benchmarks) loads it with :func:`default_params`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ParamsError",
    "ADDED_PARAMS",
    "ADDED_PARAMS_HINT",
    "with_added_params",
    "Params",
    "DataParams",
    "DepthParams",
    "CaptionParams",
    "FeaturesParams",
    "ModelParams",
    "TrainParams",
    "EvaluateParams",
    "OT_SOLVERS",
    "DEPTH_EMBEDDINGS",
    "OT_MODES",
    "RANGES",
    "load_params",
    "read_params_yaml",
    "default_params",
    "params_from_dict",
    "params_mapping",
    "params_to_dict",
    "flatten",
    "apply_overrides",
    "section_hash",
    "pipeline_problems",
    "floor_problem",
]


class ParamsError(ValueError):
    """A params file that does not match the schema."""


@dataclass(frozen=True)
class SyntheticParams:
    seed: int
    train: int
    valid: int
    test: int
    image_size: int
    images_per_split: int


@dataclass(frozen=True)
class UmreParams:
    dataset_id: str
    partner_id: str
    dataset_sha256: str
    partner_sha256: str


@dataclass(frozen=True)
class MnreParams:
    text_url: str
    images_id: str
    images_sha256: str


@dataclass(frozen=True)
class LocalParams:
    path: str
    format: Literal["umre", "mnre"]
    labels: str


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "umre", "mnre", "local"]
    on_error: Literal["raise", "skip"]
    max_objects: int
    max_seq: int
    pad_to_max: bool
    use_depth: bool
    use_caption: bool
    use_box: bool
    synthetic: SyntheticParams
    umre: UmreParams
    mnre: MnreParams
    local: LocalParams


Dtype = Literal["float32", "float16", "bfloat16"]
OTSolver = Literal["log_sinkhorn", "sinkhorn", "fused"]
OT_SOLVERS: tuple[str, ...] = typing.get_args(OTSolver)
OTMode = Literal["transport", "uniform"]
OT_MODES: tuple[str, ...] = typing.get_args(OTMode)
DepthEmbedding = Literal["tokens", "channel"]
DEPTH_EMBEDDINGS: tuple[str, ...] = typing.get_args(DepthEmbedding)


@dataclass(frozen=True)
class DepthParams:
    source: Literal["model", "dataset"]
    model: str
    batch_size: int
    dtype: Dtype
    shard_size: int


@dataclass(frozen=True)
class CaptionParams:
    backend: Literal["mllm", "file", "none"]
    model: str
    file: str
    prompts: str
    max_new_tokens: int
    batch_size: int
    dtype: Dtype
    on_missing: Literal["fail", "fill"]


@dataclass(frozen=True)
class FeaturesParams:
    crop_size: int
    crop_resize: Literal["clip", "stretch"]
    depth_scale: Literal["raw", "minmax"]
    shard_size: int
    image_shard_size: int


@dataclass(frozen=True)
class OTParams:
    enabled: bool
    mode: OTMode
    epsilon: float
    iterations: int
    kernel_floor: float
    barycentric: bool
    clamp: float
    solver: OTSolver


@dataclass(frozen=True)
class MoEParams:
    enabled: bool


@dataclass(frozen=True)
class HeadParams:
    project_without_caption: bool


@dataclass(frozen=True)
class ModelParams:
    text_model: str
    vision_model: str
    pretrained: bool
    init: Literal["original", "normal"]
    depth_embedding: DepthEmbedding
    pool_after_layer: int
    fusion_start_layer: int
    dropout: float
    ot: OTParams
    moe: MoEParams
    head: HeadParams


@dataclass(frozen=True)
class TrainParams:
    seed: int
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    decay_norms_and_biases: bool
    optimize: Literal["all", "original"]
    report_test_each_epoch: bool
    log_every: int
    warmup_ratio: float
    grad_accum: int
    max_grad_norm: float
    patience: int
    mixed_precision: Literal["no", "bf16", "fp16"]
    num_processes: int
    num_workers: int
    threads: int
    deterministic: bool
    log_with: list[Literal["dvclive", "tensorboard", "wandb"]]
    gradient_checkpointing: bool
    compile: bool
    tf32: bool


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int


@dataclass(frozen=True)
class Params:
    data: DataParams
    depth: DepthParams
    caption: CaptionParams
    features: FeaturesParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams

    @property
    def use_captions(self) -> bool:
        """Whether captions reach the model: ``data.use_caption`` and a caption backend other than
        ``none``. Either switch turns them off, with the same features and the same head."""
        return self.data.use_caption and self.caption.backend != "none"


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``low <= x`` (``low < x`` when ``open_low``), ``x <= high``."""

    low: float
    high: float | None = None
    open_low: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        low = f"above {_bound(self.low)}" if self.open_low else f"at least {_bound(self.low)}"
        return low if self.high is None else f"{low} and at most {_bound(self.high)}"


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, open_low=True)
# numpy's legacy seeding (accelerate's set_seed, and so train.seed) takes 0 .. 2**32 - 1 only.
SEED = Range(0, 2**32 - 1)

# Numbers whose type alone lets through values that fail later (a NaN model, a traceback deep in a
# stage, a silent no-op): checked when params load, so the message names the key.
RANGES: dict[str, Range] = {
    "data.max_objects": AT_LEAST_1,
    "data.max_seq": Range(8),  # [CLS], four markers, [SEP] and a word
    "data.synthetic.seed": SEED,
    "data.synthetic.train": Range(3),
    "data.synthetic.valid": Range(3),
    "data.synthetic.test": Range(3),
    "data.synthetic.image_size": Range(32),
    "data.synthetic.images_per_split": AT_LEAST_0,
    "depth.batch_size": AT_LEAST_1,
    "depth.shard_size": AT_LEAST_1,
    "caption.max_new_tokens": AT_LEAST_1,
    "caption.batch_size": AT_LEAST_1,
    "features.crop_size": AT_LEAST_1,
    "features.shard_size": AT_LEAST_1,
    "features.image_shard_size": AT_LEAST_1,
    "model.pool_after_layer": AT_LEAST_0,
    "model.fusion_start_layer": AT_LEAST_0,
    "model.dropout": Range(0, 1),
    "model.ot.epsilon": POSITIVE,
    "model.ot.iterations": AT_LEAST_1,
    "model.ot.kernel_floor": AT_LEAST_0,
    "model.ot.clamp": AT_LEAST_0,
    "train.seed": SEED,
    "train.epochs": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.eval_batch_size": AT_LEAST_1,
    "train.lr": AT_LEAST_0,
    "train.weight_decay": AT_LEAST_0,
    "train.log_every": AT_LEAST_0,
    "train.warmup_ratio": Range(0, 1),
    "train.grad_accum": AT_LEAST_1,
    "train.max_grad_norm": AT_LEAST_0,
    "train.patience": AT_LEAST_0,
    "train.num_processes": AT_LEAST_1,
    "train.num_workers": AT_LEAST_0,
    "train.threads": AT_LEAST_0,
    "evaluate.batch_size": AT_LEAST_1,
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{path}: expected a mapping, found {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if origin is Literal:
        # `dvc exp run -S` rewrites params.yaml by YAML 1.2 rules, leaving `no` unquoted, which
        # YAML 1.1 readers (PyYAML) load as False: read it back as the choice it was.
        if value is False and "no" in typing.get_args(tp):
            return "no"
        if value not in typing.get_args(tp):
            raise ParamsError(f"{path}: expected {_type_name(tp)}, found {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{path}: expected a list, found {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, path)
            except ParamsError:
                continue
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ParamsError(f"{path}: expected {names}, found {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{path}: expected null, found {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{path}: expected bool, found {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{path}: expected int, found {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # YAML reads `1e-5` (no dot) as a string; accept ints and such numeric strings.
        if isinstance(value, bool):
            raise ParamsError(f"{path}: expected float, found bool {value!r}")
        number = None
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ParamsError(f"{path}: expected float, found {type(value).__name__} {value!r}")
        if not math.isfinite(number):  # YAML's .inf / .nan, or "inf" given with -S
            raise ParamsError(f"{path}: expected a finite float, found {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{path}: expected str, found {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{path}: unsupported schema type {tp!r}")


def _build(cls: type, raw: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ParamsError(
            f"{prefix}{unknown[0]}: unknown key (known keys under {path or 'the top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    missing = sorted(fields - set(raw))
    if missing:
        key = missing[0]
        raise ParamsError(f"{prefix}{key}: missing key (expected {_type_name(hints[key])})")
    values = {k: _convert(hints[k], raw[k], prefix + k) for k in sorted(fields)}
    for key, value in values.items():
        allowed = RANGES.get(prefix + key)
        if allowed is not None and not (value == value and allowed.admits(value)):
            raise ParamsError(f"{prefix}{key}: expected a number {allowed}, found {value!r}")
    return cls(**values)


# Params added after models were saved, each with the value that reproduces what the code did
# before the key existed: a saved model folder (trained.json, config.json) without the key reads
# as if it had this value. Adding a param that changes behaviour? Add it here too, or every
# existing model folder stops loading ("missing key").
ADDED_PARAMS: dict[str, Any] = {"data.local.labels": "", "model.depth_embedding": "tokens"}
# What a saved folder's missing-key error adds, in trained.json and in config.json alike.
ADDED_PARAMS_HINT = (
    "a folder saved before that param existed: its old-behaviour value belongs in "
    "pipeline.config.ADDED_PARAMS"
)


def with_added_params(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``raw`` (the nested params of a saved model, or its section at dotted ``prefix``) with the
    keys of :data:`ADDED_PARAMS` it lacks filled in; a section it lacks stays absent."""
    out = dict(raw)
    for dotted, value in ADDED_PARAMS.items():
        if not dotted.startswith(prefix):
            continue
        *path, key = dotted[len(prefix) :].split(".")
        node = out
        for part in path:
            if not isinstance(node.get(part), dict):
                break
            node[part] = node = dict(node[part])
        else:
            node.setdefault(key, value)
    return out


def params_mapping(raw: Any, where: str = "params") -> dict[str, Any]:
    """``raw`` if it is a mapping, as a params document's top level must be."""
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{where}: expected a mapping at the top level, found {type(raw).__name__}"
        )
    return raw


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build :class:`Params` from a nested mapping, strictly (every key present, nothing extra)."""
    return _build(Params, params_mapping(raw), "")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``dotted.key -> leaf`` (the keys ``-S`` and presets use)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params_to_dict(obj: Any) -> dict[str, Any]:
    """The nested plain-dict form of a params object (or of one section)."""
    return dataclasses.asdict(obj)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def read_params_yaml(path: str | Path) -> Any:
    """The YAML document of a params file, unvalidated. Errors are one line that names the file
    and, where YAML knows it, the line: ``params.yaml:3: not valid YAML: ...``."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: params file not found") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ParamsError(f"{where}: not valid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``; errors name the file and the key path."""
    path = Path(path)
    raw = read_params_yaml(path)
    try:
        return params_from_dict(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from exc


# The checkout's params.yaml (the package is used from a source tree or an editable install).
DEFAULT_PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def default_params(overrides: dict[str, Any] | None = None) -> Params:
    """The shipped ``params.yaml`` with dotted-key overrides applied (tests, benchmarks)."""
    return apply_overrides(load_params(DEFAULT_PARAMS_FILE), overrides or {})


def apply_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """Return a copy with dotted-key overrides applied (``{"model.ot.enabled": False}``), validated."""
    raw = params_to_dict(params)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ParamsError(f"{dotted}: unknown key")
            node = node[key]
        if leaf not in node:
            raise ParamsError(f"{dotted}: unknown key")
        node[leaf] = value
    return params_from_dict(raw)


def section_hash(*sections: Any) -> str:
    """A short stable hash of one or more params sections (or plain values), for cache metadata."""
    payload = json.dumps(
        [params_to_dict(s) if dataclasses.is_dataclass(s) else s for s in sections],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pipeline_problems(params: Params) -> list[str]:
    """Settings that each load but cannot run together, as ``key: problem; remedy`` lines (the
    ``check`` stage reports them before any other stage runs)."""
    data, problems = params.data, []
    mnre = data.source == "mnre" or (data.source == "local" and data.local.format == "mnre")
    if params.depth.source == "dataset" and data.source != "synthetic":
        problems.append(
            f"depth.source: 'dataset' reads the depth maps a dataset ships, and only "
            f"data.source 'synthetic' ships them (data.source is {data.source!r}); set "
            "depth.source: model (Depth-Anything-V2, depth.model)"
        )
    if data.local.labels and data.source != "local":
        problems.append(
            f"data.local.labels: {data.local.labels!r} is read only with data.source 'local' "
            f"(data.source is {data.source!r}, which has its own relations); set "
            "data.source: local with data.local.path, or data.local.labels: ''"
        )
    caption = params.caption
    if caption.backend == "file" and not caption.file and mnre:
        problems.append(
            "caption.backend: 'file' with caption.file '' reads the dataset's own captions, and "
            "MNRE ships none; set caption.backend: mllm or none, or caption.file"
        )
    ot = params.model.ot
    problem = floor_problem(ot.solver, ot.kernel_floor)
    if ot.enabled and ot.mode == "transport" and problem:
        problems.append(problem)
    return problems


def floor_problem(solver: str, kernel_floor: float) -> str | None:
    """Why ``solver`` cannot run with ``kernel_floor``, or None: in the plain domain,
    ``exp(-C/eps)`` underflows to 0 for costs above ~50 eps and the scalings divide by it."""
    if solver in ("sinkhorn", "fused") and kernel_floor <= 0:
        return (
            f"model.ot.kernel_floor: the plain-domain solver {solver!r} needs a floor above 0 "
            "(model.ot.kernel_floor > 0: exp(-C/eps) underflows to 0); use model.ot.solver: "
            "log_sinkhorn for pure entropic OT"
        )
    return None
