"""Params loading: strict schema, errors that name the key path and expected type."""

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    Params,
    ParamsError,
    apply_overrides,
    default_params,
    flatten,
    load_params,
    params_from_dict,
    params_to_dict,
    pipeline_problems,
    section_hash,
    with_added_params,
)

ROOT = Path(__file__).resolve().parents[1]


def raw_default() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_and_round_trip():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "synthetic"
    assert params.model.ot.kernel_floor == pytest.approx(1e-12)
    # Every key of params.yaml round-trips through the typed object unchanged.
    assert params_to_dict(params) == raw_default()


def test_params_yaml_is_the_only_home_of_defaults():
    # No section dataclass carries a default that could drift from params.yaml.
    sections, seen = [Params], 0
    while sections:
        cls = sections.pop()
        seen += 1
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING, f"{cls.__name__}.{f.name}"
            assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                sections.append(hints[f.name])
    assert seen == 15  # Params and its 14 sections
    assert default_params() == load_params(ROOT / "params.yaml")
    assert default_params({"train.lr": 0.5}).train.lr == 0.5


def test_unknown_key_names_its_path():
    raw = raw_default()
    raw["model"]["ot"]["epsilonn"] = 0.5
    with pytest.raises(ParamsError, match=r"model\.ot\.epsilonn: unknown key"):
        params_from_dict(raw)


def test_missing_key_names_its_path_and_type():
    raw = raw_default()
    del raw["train"]["lr"]
    with pytest.raises(ParamsError, match=r"train\.lr: missing key \(expected float\)"):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("train", "epochs"), "ten", r"train\.epochs: expected int, found str 'ten'"),
        (("train", "epochs"), 2.5, r"train\.epochs: expected int, found float 2\.5"),
        (("train", "epochs"), True, r"train\.epochs: expected int, found bool True"),
        (("data", "pad_to_max"), "yes", r"data\.pad_to_max: expected bool, found str 'yes'"),
        (("model", "ot", "epsilon"), "abc", r"model\.ot\.epsilon: expected float, found str"),
        (("data", "source"), "imdb", r"data\.source: expected one of 'synthetic', 'umre'"),
        (("model", "ot"), 3, r"model\.ot: expected a mapping, found int 3"),
        (("train", "lr"), True, r"train\.lr: expected float, found bool True"),
        # A number without an upper bound would take infinity, and NaN passes no comparison.
        (("train", "lr"), float("inf"), r"train\.lr: expected a finite float, found inf$"),
        (("train", "lr"), "inf", r"train\.lr: expected a finite float, found 'inf'$"),
        (("model", "ot", "epsilon"), float("nan"), r"epsilon: expected a finite float, found nan$"),
        (("model", "text_model"), 5, r"model\.text_model: expected str, found int 5"),
        (("train", "log_with"), "dvclive", r"train\.log_with: expected a list, found str"),
        # Only a choice that has `no` reads an unquoted `no` back as it.
        (("data", "source"), False, r"data\.source: expected one of 'synthetic'.*found False"),
    ],
)
def test_wrong_type_names_path_and_expected_type(path, value, expected):
    raw = raw_default()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=expected):
        params_from_dict(raw)


def test_float_accepts_int_and_yaml_exponent_strings():
    raw = raw_default()
    raw["train"]["lr"] = "1e-5"  # YAML 1.1 reads 1e-5 (no dot) as a string
    raw["model"]["ot"]["epsilon"] = 1
    params = params_from_dict(raw)
    assert params.train.lr == pytest.approx(1e-5)
    assert isinstance(params.model.ot.epsilon, float)


def test_load_params_prefixes_the_file_name(tmp_path):
    bad = tmp_path / "p.yaml"
    raw = raw_default()
    raw["depth"]["batch_size"] = "8"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"p\.yaml: depth\.batch_size: expected int"):
        load_params(bad)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_overrides_are_validated():
    params = load_params(ROOT / "params.yaml")
    changed = apply_overrides(params, {"model.ot.enabled": False, "train.lr": 2e-5})
    assert changed.model.ot.enabled is False and changed.train.lr == pytest.approx(2e-5)
    assert params.model.ot.enabled is True  # the original is untouched
    with pytest.raises(ParamsError, match=r"model\.ot\.nope: unknown key"):
        apply_overrides(params, {"model.ot.nope": 1})
    with pytest.raises(ParamsError, match=r"model\.ot\.enabled: expected bool"):
        apply_overrides(params, {"model.ot.enabled": "no"})


def test_section_hash_is_stable_and_sensitive():
    params = load_params(ROOT / "params.yaml")
    same = load_params(ROOT / "params.yaml")
    assert section_hash(params.features, params.data) == section_hash(same.features, same.data)
    other = apply_overrides(params, {"data.max_seq": 32})
    assert section_hash(params.features, params.data) != section_hash(other.features, other.data)
    # A mapping hashes by its content, not by the order its keys were written in.
    assert section_hash({"data.max_seq": 8, "data.use_box": True}) == section_hash(
        {"data.use_box": True, "data.max_seq": 8}
    )


def test_unquoted_no_written_by_dvc_reads_back_as_the_choice():
    raw = raw_default()
    raw["train"]["mixed_precision"] = yaml.safe_load("no")  # what PyYAML makes of `no`
    assert params_from_dict(raw).train.mixed_precision == "no"
    raw["train"]["mixed_precision"] = True
    with pytest.raises(ParamsError, match=r"train\.mixed_precision: expected one of 'no'"):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model.ot.epsilon", 0, "above 0"),  # the NaN model of an OT temperature 0
        ("model.ot.iterations", 0, "at least 1"),
        ("features.shard_size", 0, "at least 1"),
        ("features.image_shard_size", 0, "at least 1"),
        ("features.crop_size", 0, "at least 1"),
        ("data.synthetic.valid", 2, "at least 3"),
        ("data.synthetic.image_size", 16, "at least 32"),
        ("train.warmup_ratio", -0.1, "at least 0 and at most 1"),
        ("train.patience", -1, "at least 0"),
        ("train.max_grad_norm", -1.0, "at least 0"),
        ("train.num_processes", 0, "at least 1"),
        ("train.threads", -2, "at least 0"),
        ("model.dropout", 1.5, "at least 0 and at most 1"),
        ("data.max_objects", 0, "at least 1"),
        ("data.max_seq", 7, "at least 8"),
        ("data.synthetic.train", 2, "at least 3"),
        ("data.synthetic.test", 2, "at least 3"),
        ("data.synthetic.images_per_split", -1, "at least 0"),
        ("depth.batch_size", 0, "at least 1"),
        ("depth.shard_size", 0, "at least 1"),
        ("caption.max_new_tokens", 0, "at least 1"),
        ("caption.batch_size", 0, "at least 1"),
        ("model.pool_after_layer", -1, "at least 0"),
        ("model.fusion_start_layer", -1, "at least 0"),
        ("model.ot.kernel_floor", -1e-12, "at least 0"),
        ("model.ot.clamp", -1e-8, "at least 0"),
        ("train.epochs", 0, "at least 1"),
        ("train.batch_size", 0, "at least 1"),
        ("train.eval_batch_size", 0, "at least 1"),
        ("train.lr", -1e-5, "at least 0"),
        ("train.weight_decay", -0.01, "at least 0"),
        ("train.log_every", -1, "at least 0"),
        ("train.grad_accum", 0, "at least 1"),
        ("train.num_workers", -1, "at least 0"),
        ("evaluate.batch_size", 0, "at least 1"),
        # numpy refuses these seeds deep in a stage, without naming the key
        ("data.synthetic.seed", -1, "at least 0 and at most 4294967295"),
        ("train.seed", 2**32, "at least 0 and at most 4294967295"),
    ],
)
def test_numbers_out_of_range_name_the_key(key, value, expected):
    with pytest.raises(
        ParamsError, match=rf"^{re.escape(key)}: expected a number {expected}, found"
    ):
        default_params({key: value})


def test_the_bounds_of_a_range_are_allowed():
    bounds = {"data.max_seq": 8, "model.dropout": 1.0, "train.warmup_ratio": 1.0}
    bounds |= {"model.ot.kernel_floor": 0.0, "model.ot.epsilon": 1e-9, "train.threads": 0}
    bounds |= {"data.synthetic.seed": 0, "train.seed": 2**32 - 1}
    flat = flatten(params_to_dict(default_params(bounds)))
    assert {key: flat[key] for key in bounds} == bounds


def test_captions_reach_the_model_only_with_both_switches_on():
    assert default_params({"data.use_caption": True, "caption.backend": "file"}).use_captions
    assert not default_params({"data.use_caption": True, "caption.backend": "none"}).use_captions
    assert not default_params({"data.use_caption": False, "caption.backend": "mllm"}).use_captions


def test_added_params_fill_only_what_a_saved_folder_lacks():
    raw = {"model": {"depth_embedding": "channel"}, "data": {"local": {"path": "x"}}}
    before = copy.deepcopy(raw)
    assert with_added_params(raw) == {
        "model": {"depth_embedding": "channel"},
        "data": {"local": {"path": "x", "labels": ""}},
    }
    assert raw == before  # the caller's dicts are left alone
    assert with_added_params({"model": {}, "train": {}}) == {
        "model": {"depth_embedding": "tokens"},
        "train": {},
    }
    assert with_added_params({"train": {}}) == {"train": {}}  # a section it lacks stays absent
    # A section of its own (config.json holds the model section's keys at the top).
    assert with_added_params({"ot": {}}, prefix="model.") == {"ot": {}, "depth_embedding": "tokens"}


def test_an_override_below_a_leaf_is_an_unknown_key():
    with pytest.raises(ParamsError, match=r"^train\.lr\.x: unknown key$"):
        default_params({"train.lr.x": 1})


def test_every_range_names_a_real_numeric_key():
    from pipeline.config import RANGES

    flat = {}
    stack = [("", params_to_dict(default_params()))]
    while stack:
        prefix, node = stack.pop()
        for k, v in node.items():
            if isinstance(v, dict):
                stack.append((f"{prefix}{k}.", v))
            else:
                flat[f"{prefix}{k}"] = v
    for key, allowed in RANGES.items():
        assert isinstance(flat[key], int | float) and not isinstance(flat[key], bool), key
        assert allowed.admits(flat[key]), f"the shipped {key}={flat[key]} is out of its range"


def test_a_key_given_twice_is_an_error_with_both_lines(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text + "\ntrain:\n  seed: 1\n")
    first = text.splitlines().index("train:") + 1
    second = len(text.splitlines()) + 2
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value) == (
        f"{path}:{second}: not valid YAML: duplicate key 'train' (first given on line {first})"
    )


def test_the_shipped_setups_have_no_pipeline_problems():
    from pipeline.presets import apply_preset, available_presets

    params = default_params()
    assert pipeline_problems(params) == []
    for name in available_presets():
        assert pipeline_problems(apply_preset(params, name)) == [], name


@pytest.mark.parametrize(
    ("overrides", "key", "remedy"),
    [
        ({"data.source": "umre"}, "depth.source", "set depth.source: model"),
        ({"data.source": "local"}, "depth.source", "set depth.source: model"),
        (
            {"data.source": "mnre", "depth.source": "model"},
            "caption.backend",
            "set caption.backend: mllm or none",
        ),
        (
            {"data.source": "local", "data.local.format": "mnre", "depth.source": "model"},
            "caption.backend",
            "set caption.backend: mllm or none",
        ),
        (
            {"data.local.labels": "rel2id.json"},
            "data.local.labels",
            "set data.source: local with data.local.path, or data.local.labels: ''",
        ),
        (
            {"model.ot.kernel_floor": 0.0},
            "model.ot.kernel_floor",
            "use model.ot.solver: log_sinkhorn",
        ),
        (
            {"model.ot.kernel_floor": 0.0, "model.ot.solver": "sinkhorn"},
            "model.ot.kernel_floor",
            "'sinkhorn' needs a floor above 0",
        ),
    ],
)
def test_settings_that_cannot_run_together_are_named_with_a_remedy(overrides, key, remedy):
    (problem,) = pipeline_problems(default_params(overrides))
    assert problem.startswith(f"{key}: ") and remedy in problem


@pytest.mark.parametrize(
    "overrides",
    [
        {"data.source": "umre", "depth.source": "model"},  # UMRE ships captions: file is fine
        {"data.source": "mnre", "depth.source": "model", "caption.backend": "none"},
        {"data.source": "mnre", "depth.source": "model", "caption.file": "caps.json"},
        {"model.ot.kernel_floor": 0.0, "model.ot.solver": "log_sinkhorn"},
        {"model.ot.kernel_floor": 0.0, "model.ot.mode": "uniform"},  # no solver runs
        {"model.ot.kernel_floor": 0.0, "model.ot.enabled": False},
        {"data.source": "local", "depth.source": "model", "data.local.labels": "rel2id.json"},
    ],
)
def test_settings_that_run_together_pass(overrides):
    assert pipeline_problems(default_params(overrides)) == []


def test_every_problem_is_reported_at_once():
    params = default_params({"data.source": "mnre", "model.ot.kernel_floor": 0.0})
    problems = pipeline_problems(params)
    assert [p.split(":")[0] for p in problems] == [
        "depth.source",
        "caption.backend",
        "model.ot.kernel_floor",
    ]


def test_every_name_params_accept_has_code_behind_it(tmp_path):
    """A name added to a Literal in the config, with no branch for it, is refused by the code that
    dispatches on it (the last branch used to take every other name)."""
    from pipeline.caption.run import BACKENDS, run_caption
    from pipeline.config import OT_SOLVERS, CaptionParams, LocalParams
    from pipeline.data.prepare import LOCAL_FORMATS, prepare_dataset
    from pipeline.data.records import Dataset
    from pipeline.data.synthetic import generate_synthetic
    from pipeline.model.ot import SOLVERS, MultilevelTransport

    assert set(SOLVERS) == set(OT_SOLVERS)
    assert set(BACKENDS) == set(typing.get_args(typing.get_type_hints(CaptionParams)["backend"]))
    assert set(LOCAL_FORMATS) == set(typing.get_args(typing.get_type_hints(LocalParams)["format"]))
    with pytest.raises(ValueError, match="model.ot.solver 'greenkhorn': this code implements"):
        MultilevelTransport(8, 0.5, 5, 1e-12, False, 1e-8, "greenkhorn")
    params = default_params({"data.synthetic.train": 6, "data.synthetic.valid": 3,
                             "data.synthetic.test": 3, "data.synthetic.image_size": 48})  # fmt: skip
    generate_synthetic(tmp_path / "raw", params.data.synthetic, params.data.max_objects)
    api = dataclasses.replace(params.caption, backend="api")
    with pytest.raises(ValueError, match="caption.backend 'api': this code implements"):
        run_caption(Dataset(tmp_path / "raw"), tmp_path / "captions", api)
    local = default_params({"data.source": "local", "data.local.path": str(tmp_path / "raw")}).data
    local = dataclasses.replace(local, local=dataclasses.replace(local.local, format="more"))
    params = dataclasses.replace(params, data=local)
    with pytest.raises(ValueError, match="data.local.format 'more': this code reads"):
        prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
