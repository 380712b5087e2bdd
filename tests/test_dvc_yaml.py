"""dvc.yaml against the code: each stage depends on exactly the modules its command runs, and on
the params it reads; no knob has a second home."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest
import yaml

from pipeline.config import default_params, flatten, params_to_dict

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = list(DVC["stages"])
# Read params (whose values DVC tracks itself) or report errors: documented in dvc.yaml's header.
# The `check` stage's code is the params validation, so it lists pipeline/config.py.
NOT_DEPS = {"pipeline.config", "stages.common"}
CHECK = "check"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def code_deps(stage: str) -> set[str]:
    """The modules a stage's deps cover (folders expanded), package ``__init__`` files left out."""
    modules = set()
    for dep in DVC["stages"][stage]["deps"]:
        path = ROOT / dep
        if path.is_dir():
            files = path.rglob("*.py")
        elif path.suffix == ".py":
            files = [path]
        else:
            continue
        modules |= {module_name(f) for f in files if f.name != "__init__.py"}
    return modules


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("pipeline", "stages")


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_modules_the_stage_runs(graph, stage):
    command = f"stages.{stage}"
    runs = {command} | {
        m for m in graph.find_upstream_modules(command) if m.startswith(("pipeline.", "stages."))
    }
    packages = {m for m in runs if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    not_deps = NOT_DEPS - {"pipeline.config"} if stage == CHECK else NOT_DEPS
    assert code_deps(stage) == runs - not_deps - packages


def test_package_init_files_hold_only_a_docstring():
    # So that importing one module of a package runs no other code the deps would have to list.
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        if init.parent.name == "presets":  # a module in its own right, listed where it is used
            continue
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), (
            init
        )


def flat(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= flat(value, f"{prefix}{key}.")
    return keys


RESULT_STAGES = [stage for stage in STAGES if stage != CHECK]


def test_the_check_stage_comes_first_tracks_every_param_and_makes_nothing():
    # dvc runs independent stages in the order dvc.yaml lists them: first is what makes a bad
    # params.yaml stop `dvc exp run` before any other stage runs.
    assert STAGES[0] == CHECK
    check = DVC["stages"][CHECK]
    assert check["params"] == [{"params.yaml": None}]  # the whole file
    assert "outs" not in check and "metrics" not in check
    assert all((ROOT / dep).is_file() for dep in check["deps"])  # code only: it waits for nothing


@pytest.mark.parametrize("stage", RESULT_STAGES)
def test_listed_params_exist(stage):
    known = flat(params_to_dict(default_params()))
    assert set(DVC["stages"][stage].get("params", [])) <= known


def test_throughput_knobs_rerun_nothing():
    listed = {key for stage in RESULT_STAGES for key in DVC["stages"][stage].get("params", [])}
    knobs = ("train.num_workers", "train.eval_batch_size", "evaluate.batch_size")
    for knob in (*knobs, "train.gradient_checkpointing"):
        assert knob not in listed and knob.split(".")[0] not in listed


# Params no result stage tracks, on purpose: they change how fast or where a run logs, never its
# outputs (a test above checks that the throughput knobs re-run nothing). A new param that changes
# a result must be listed by its stage in dvc.yaml, or `dvc exp run -S` would re-run only `check`
# and report the old metrics.
UNTRACKED = {
    "depth.batch_size": "images per forward pass of the depth model",
    "caption.batch_size": "items per generate call",
    "train.eval_batch_size": "dev scoring batch",
    "train.num_workers": "loader processes",
    "train.log_with": "extra trackers (tensorboard, wandb)",
    "train.gradient_checkpointing": "recomputes activations, same gradients (tested)",
    "evaluate.batch_size": "test scoring batch",
}


def test_every_param_that_changes_a_result_is_tracked_by_a_stage():
    leaves = set(flatten(params_to_dict(default_params())))
    listed = {key for stage in RESULT_STAGES for key in DVC["stages"][stage].get("params", [])}
    covered = {key for key in leaves if any(key == x or key.startswith(x + ".") for x in listed)}
    assert leaves - covered == set(UNTRACKED)


def test_every_param_of_the_features_stage_is_in_the_cache_key_or_its_layout():
    # The loader refuses a cache built with other `cache_settings` (a row's bytes); a killed build
    # resumes only with the same `layout_settings` too. A param the stage gains must go in one of
    # them, or a cache built with another value would be trusted.
    from pipeline.features.dataset import cache_settings, layout_settings

    params = default_params()
    leaves = set(flatten(params_to_dict(params)))
    listed = DVC["stages"]["features"]["params"]
    tracked = {key for key in leaves if any(key == x or key.startswith(x + ".") for x in listed)}
    in_key, in_layout = set(cache_settings(params)), set(layout_settings(params))
    assert not in_key & in_layout
    assert tracked == in_key | in_layout
