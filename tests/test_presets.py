"""The paper preset resolves to valid params whose model names fit their loaders."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml

from pipeline import hub
from pipeline.config import ParamsError, flatten, load_params, params_to_dict
from pipeline.presets import (
    apply_preset,
    as_exp_flags,
    available_presets,
    load_preset,
    write_into_params,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml")


def test_presets_exist():
    assert {"paper", "paper-mllm"} <= set(available_presets())


@pytest.mark.parametrize("name", ["paper", "paper-mllm"])
def test_paper_preset_is_the_paper_setup(params, name):
    p = apply_preset(params, name)
    assert p.data.source == "umre"
    assert (p.data.max_seq, p.data.pad_to_max) == (256, True)
    assert (p.train.batch_size, p.train.lr, p.train.warmup_ratio) == (32, 1e-5, 0.06)
    assert (p.train.epochs, p.train.seed, p.train.weight_decay) == (30, 1234, 0.01)
    # The original's training: fp32, no clipping, decay on every parameter.
    assert (p.train.mixed_precision, p.train.max_grad_norm) == ("no", 0)
    assert p.train.tf32 is False  # full fp32 matrix products on GPUs, as PyTorch's default
    assert p.train.decay_norms_and_biases is True
    # The original's protocol stays opt-in (train every parameter, select on dev).
    assert (p.train.optimize, p.train.report_test_each_epoch) == ("all", False)
    assert (p.model.pool_after_layer, p.model.fusion_start_layer) == (7, 8)
    assert (p.model.ot.kernel_floor, p.model.ot.barycentric, p.model.ot.epsilon) == (
        1e-12,
        False,
        0.5,
    )
    assert p.model.ot.iterations == 50
    assert p.depth.source == "model"


@pytest.mark.parametrize("name", ["paper", "paper-mllm"])
def test_paper_preset_has_the_originals_preprocessing_and_init(params, name):
    p = apply_preset(params, name)
    # Item by item (issue: paper fidelity): crops, depth values, init, Sinkhorn clamp.
    assert p.features.crop_resize == "clip"
    assert p.features.depth_scale == "raw"
    assert p.model.init == "original"
    assert p.model.ot.clamp == 1e-8
    assert p.model.dropout == 0.1  # after object pooling (BERT's hidden dropout)
    # The embedded default has the same fidelity settings.
    assert (params.features.crop_resize, params.features.depth_scale) == ("clip", "raw")
    assert (params.model.init, params.model.ot.clamp) == ("original", 1e-8)
    assert params.train.decay_norms_and_biases is True
    assert (params.train.optimize, params.train.report_test_each_epoch) == ("all", False)


@pytest.mark.parametrize("name", ["paper", "paper-mllm"])
def test_paper_model_names_are_well_formed_for_their_loaders(params, name):
    p = apply_preset(params, name)
    # transformers hub ids (text tower, depth model, captioner)
    for model_name in (p.model.text_model, p.depth.model, p.caption.model):
        if p.caption.backend != "mllm" and model_name == p.caption.model:
            continue
        assert hub.resolve(model_name).kind == "hub", model_name
    assert p.model.text_model == "bert-base-uncased"
    assert p.depth.model == "depth-anything/Depth-Anything-V2-Large-hf"
    # timm: the exact pretrained tag of OpenAI's CLIP ViT-B/32 with QuickGELU
    assert p.model.vision_model in timm.list_pretrained()
    assert p.model.vision_model == "vit_base_patch32_clip_quickgelu_224.openai"


def test_mllm_variant_extends_paper():
    paper, mllm = load_preset("paper"), load_preset("paper-mllm")
    assert mllm["caption.backend"] == "mllm"
    assert mllm["caption.model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert {k: v for k, v in mllm.items() if k not in paper} == {
        "caption.model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "caption.dtype": "bfloat16",
        "caption.batch_size": 16,
    }


def test_unknown_preset_and_bad_key_are_refused(params, tmp_path, monkeypatch):
    with pytest.raises(ParamsError) as error:
        load_preset("nope")
    names = available_presets()
    assert names == sorted(names)  # listed in order, whatever order the folder gives
    assert str(error.value) == f"unknown preset 'nope' (available: {', '.join(names)})"
    import pipeline.presets as presets

    (tmp_path / "bad.yaml").write_text("model.ot.epsilonn: 0.5\n")
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    with pytest.raises(ParamsError, match=r"preset 'bad': model\.ot\.epsilonn: unknown key"):
        apply_preset(params, "bad")


def test_flags_parse_back_to_the_preset_values():
    overrides = load_preset("paper")
    flags = as_exp_flags(overrides)
    assert flags[0::2] == ["-S"] * len(overrides)
    parsed = {}
    for flag in flags[1::2]:
        key, _, text = flag.partition("=")
        parsed[key] = yaml.safe_load(text)
    assert parsed == overrides


def test_apply_writes_params_keeping_comments(params, tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    write_into_params(target, load_preset("paper"))
    assert load_params(target) == apply_preset(params, "paper")
    assert "# Parameters, grouped by stage." in target.read_text()


def test_cli_prints_flags_and_applies(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    cmd = [sys.executable, "-m", "stages", "preset", "paper", "--params", str(target)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-S data.source=umre" in out and "-S train.lr=1.0e-05" in out
    subprocess.run([*cmd, "--apply"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert load_params(target).data.source == "umre"


def _model_folder(tmp_path: Path, params) -> Path:
    """A model folder as far as `preset` reads it: trained.json (no weights)."""
    import json

    from pipeline.config import params_to_dict
    from pipeline.model.saved import FORMAT_VERSION, TRAINED_FILE

    folder = tmp_path / "model"
    folder.mkdir()
    meta = {"format": FORMAT_VERSION, "params": params_to_dict(params)}
    (folder / TRAINED_FILE).write_text(json.dumps(meta))
    return folder


def test_a_model_folder_gives_the_flags_that_retrain_it(params, tmp_path):
    from typer.testing import CliRunner

    from pipeline.config import apply_overrides
    from stages.cli import app

    changed = {"model.ot.mode": "uniform", "train.epochs": 1, "train.num_processes": 2}
    trained = apply_overrides(params, changed)
    folder = _model_folder(tmp_path, trained)
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    result = CliRunner().invoke(app, ["preset", str(folder), "--params", str(target)])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == as_exp_flags(changed)  # only what differs, in schema order
    result = CliRunner().invoke(app, ["preset", str(folder), "--params", str(target), "--apply"])
    assert result.exit_code == 0, result.output
    assert load_params(target) == trained
    result = CliRunner().invoke(app, ["preset", str(folder), "--params", str(target)])
    assert result.exit_code == 0 and result.stdout.strip() == ""  # nothing left to change


def test_a_model_folder_with_params_of_another_schema_is_refused(params, tmp_path):
    import json

    from typer.testing import CliRunner

    from stages.cli import app

    folder = _model_folder(tmp_path, params)
    meta = json.loads((folder / "trained.json").read_text())
    meta["params"]["train"]["old_knob"] = 1
    (folder / "trained.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(app, ["preset", str(folder), "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 2
    assert f"error: {folder / 'trained.json'}: params: train.old_knob: unknown key" in result.output


def test_a_model_folder_of_another_format_is_refused_in_one_line(params, tmp_path):
    import json

    from typer.testing import CliRunner

    from stages.cli import app

    folder = _model_folder(tmp_path, params)
    meta = json.loads((folder / "trained.json").read_text())
    meta["format"] = 1
    (folder / "trained.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(app, ["preset", str(folder), "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert f"error: {folder / 'trained.json'}: format 1, expected 2" in result.output


# Each switch of the README's fidelity table and the original's value; the last two are the rows
# where the paper preset keeps the better practice instead (README, below the table).
ORIGINAL = {
    "model.ot.kernel_floor": 1e-12,
    "model.ot.barycentric": False,
    "model.ot.mode": "transport",
    "model.ot.clamp": 1e-8,
    "model.init": "original",
    "model.depth_embedding": "tokens",
    "features.crop_resize": "clip",
    "features.depth_scale": "raw",
    "data.pad_to_max": True,
    "model.head.project_without_caption": False,
    "train.decay_norms_and_biases": True,
    "train.max_grad_norm": 0,
    "train.mixed_precision": "no",
    "train.tf32": False,
}
BETTER_PRACTICE = {"train.optimize": "all", "train.report_test_each_epoch": False}


def readme_fidelity_switches() -> list[str]:
    """The params of the README's table of the original's quirks, in order."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| param | original"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip().strip("`"))
    return rows


@pytest.mark.parametrize("name", ["paper", "paper-mllm"])
def test_paper_preset_sets_every_switch_of_the_fidelity_table(params, name):
    switches = readme_fidelity_switches()
    assert switches[-2:] == list(BETTER_PRACTICE)
    assert set(switches) == set(ORIGINAL) | set(BETTER_PRACTICE)
    overrides = load_preset(name)
    flat = flatten(params_to_dict(apply_preset(params, name)))
    for key, value in {**ORIGINAL, **BETTER_PRACTICE}.items():
        assert key in overrides, f"preset {name} leaves {key} to params.yaml"
        assert flat[key] == value, key
    # Depth runs in float32, as the original; float16 is a speed option, not the paper's.
    assert flat["depth.dtype"] == "float32"


def test_the_model_card_lists_the_readmes_fidelity_switches_in_order(params):
    from pipeline.model.card import model_card

    lines = model_card(params, ["none", "a"], {}).splitlines()
    start = lines.index("| param | this model | paper preset |")
    keys = [row.split("`")[1] for row in lines[start + 2 : lines.index("", start)]]
    # Beside the table's switches, the card shows the OT solver (a speed choice) after the clamp.
    assert keys.pop(keys.index("model.ot.clamp") + 1) == "model.ot.solver"
    assert keys == readme_fidelity_switches()


def test_cli_refuses_a_bad_preset_before_printing_or_writing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import pipeline.presets as presets
    from stages.cli import app

    (tmp_path / "bad.yaml").write_text("model.ot.epsilonn: 0.5\n")
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    for extra in ([], ["--apply"]):
        result = CliRunner().invoke(app, ["preset", "bad", "--params", str(target), *extra])
        assert result.exit_code == 2 and result.stdout == ""
        assert "model.ot.epsilonn: unknown key" in result.output
    assert target.read_text() == (ROOT / "params.yaml").read_text()


def test_a_folder_that_is_no_model_is_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    folder = tmp_path / "empty"
    folder.mkdir()
    result = CliRunner().invoke(app, ["preset", str(folder), "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output == f"error: {folder}: not a trained model folder (no trained.json)\n"


def test_apply_says_how_many_keys_it_wrote(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    result = CliRunner().invoke(app, ["preset", "paper", "--params", str(target), "--apply"])
    assert result.exit_code == 0, result.output
    n = len(yaml.safe_load((ROOT / "pipeline" / "presets" / "paper.yaml").read_text()))
    assert result.output == f"{target}: applied preset 'paper' ({n} keys)\n"


@pytest.mark.parametrize("name", ["paper", "paper-mllm"])
def test_paper_preset_runs_the_whole_model_on_pretrained_towers_and_umres_captions(params, name):
    p = apply_preset(params, name)
    overrides = load_preset(name)
    # The paper's full model, set by the preset itself (not left to params.yaml): no ablation.
    for key in ("model.pretrained", "model.ot.enabled", "model.moe.enabled"):
        assert overrides[key] is True, key
    assert (p.data.use_depth, p.data.use_caption, p.data.use_box) == (True, True, True)
    assert (p.data.max_objects, p.features.crop_size) == (12, 64)
    # The OT solver the README names for the paper preset (any kernel_floor; POT's plans).
    assert p.model.ot.solver == "log_sinkhorn"
    if name == "paper":  # UMRE's shipped Qwen2.5-VL captions: the dataset's own captions.json
        assert (p.caption.backend, p.caption.file) == ("file", "")
    else:
        assert p.caption.backend == "mllm"


def test_a_preset_of_comments_only_sets_nothing_and_one_of_another_shape_is_refused(
    params, tmp_path, monkeypatch
):
    import pipeline.presets as presets

    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_preset("empty") == {}
    assert apply_preset(params, "empty") == params
    (tmp_path / "listed.yaml").write_text("- data.source: umre\n")
    with pytest.raises(ParamsError) as error:
        load_preset("listed")
    assert (
        str(error.value)
        == f"{tmp_path / 'listed.yaml'}: expected a mapping of dotted keys to values"
    )


def test_flags_write_lists_in_hydras_syntax_and_refuse_white_space():
    # A model trained with several trackers gives this flag (`preset <model folder>`).
    assert as_exp_flags({"train.log_with": ["dvclive", "tensorboard"], "caption.file": ""}) == [
        "-S", "train.log_with=[dvclive,tensorboard]", "-S", "caption.file=''",
    ]  # fmt: skip
    with pytest.raises(ParamsError) as error:
        as_exp_flags({"caption.file": "my captions.json"})
    assert str(error.value) == (
        "preset value for caption.file has white space; not expressible as a flag"
    )


def test_apply_refuses_a_key_the_params_file_lacks_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    import os

    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    before = target.read_text()
    with pytest.raises(ParamsError) as error:
        write_into_params(target, {"data.source": "umre", "train.epoch": 3})
    assert str(error.value) == f"{target}: train.epoch: unknown key"
    assert target.read_text() == before

    def disk_full(src, dst):
        raise OSError("disk full")

    # The file is replaced in one rename: a write that fails leaves the old params whole.
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_into_params(target, {"data.source": "umre"})
    assert target.read_text() == before


def test_preset_reads_and_writes_params_yaml_in_the_working_folder_by_default(
    tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from stages.cli import app

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "paper").write_text("notes\n")  # a file of that name is no model folder
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["preset", "paper", "--apply"])
    assert result.exit_code == 0, result.output
    # The note goes to stderr: stdout stays what `dvc exp run $(...)` may read.
    assert result.stdout == ""
    assert result.stderr.startswith("params.yaml: applied preset 'paper' (")
    assert load_params(tmp_path / "params.yaml").data.source == "umre"
