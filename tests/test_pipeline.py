"""End-to-end smoke: the DVC pipeline in a temporary git repo, as a researcher would run it.

Runs `dvc repro` on the embedded default at the smallest sizes (with the tiny depth model and the
tiny captioner, so those code paths run too), then `dvc exp run -S train.epochs=1`, and checks that
re-runs are cheap: nothing re-runs when nothing changed, `train.lr` re-runs only train and evaluate,
`caption.*` does not re-run depth, a comment in the features builder leaves train up to date and
an edit of the metric code invalidates train and evaluate, a bad param stops `dvc exp run` at the
first stage, `check`, and `dvc checkout` returns to the commit's trained model without retraining.
Select with `pytest -m pipeline`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.pipeline

SMALL = {
    "data": {"synthetic": {"train": 48, "valid": 16, "test": 16, "image_size": 64}},
    "depth": {"source": "model", "batch_size": 4},
    "caption": {"backend": "mllm", "max_new_tokens": 4, "batch_size": 8},
    "train": {"epochs": 2, "batch_size": 16},
}


def _merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict):
            _merge(base[key], value)
        else:
            base[key] = value


def run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout + proc.stderr


def project_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore: the working tree a clone would have."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    for name in project_files():
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    _merge(params, SMALL)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.lock").unlink(missing_ok=True)
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "smoke@test.local"], repo)
    run(["git", "config", "user.name", "smoke"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "smoke"], repo)
    run([str(BIN / "dvc"), "repro"], repo)
    return repo


def dvc(repo: Path, *args: str) -> str:
    return run([str(BIN / "dvc"), *args], repo)


def changed_stages(repo: Path) -> set[str]:
    """Stages whose own deps, params or outs changed (`dvc status`)."""
    return set(json.loads(dvc(repo, "status", "--json")))


def stages_to_rerun(repo: Path) -> set[str]:
    """Stages `dvc repro` would run, downstream ones included (`dvc repro --dry`)."""
    return set(re.findall(r"Running stage '([\w-]+)'", dvc(repo, "repro", "--dry")))


def test_repro_writes_metrics_with_the_documented_keys(repo):
    metrics = json.loads((repo / "metrics" / "test.json").read_text())
    for key in ("micro_f1", "micro_precision", "micro_recall", "accuracy", "macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert set(metrics["by_pair_kind"]) == {"text-text", "text-object", "object-object"}
    for kind in metrics["by_pair_kind"].values():
        assert set(kind) == {"micro_f1", "support"}
    assert (repo / "models" / "best" / "model.safetensors").is_file()
    assert changed_stages(repo) == set()


def test_second_repro_does_nothing(repo):
    assert stages_to_rerun(repo) == set()
    out = dvc(repo, "repro")
    assert "Running stage" not in out, out


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def test_only_train_and_evaluate_depend_on_lr(repo):
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["caption"]["max_new_tokens"] += 1
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        would_run = stages_to_rerun(repo)
        assert "caption" in would_run and not would_run & {"download", "depth"}
        params = yaml.safe_load(original)
        params["train"]["lr"] = params["train"]["lr"] * 2
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert ran_stages(dvc(repo, "repro")) == {"check", "train", "evaluate"}
    finally:
        params_path.write_text(original)
    # Back to the original lr: train and evaluate come back from the run-cache, no retraining
    # (check, which makes nothing, runs: a second).
    out = dvc(repo, "repro")
    assert ran_stages(out) == {"check"}, out
    assert "Stage 'train' is cached" in out
    assert changed_stages(repo) == set()


def test_a_bad_param_stops_exp_run_before_any_other_stage(repo):
    # No stage lists evaluate.batch_size (a throughput knob): only `check` stands between this
    # value and an experiment that "succeeds" on the old outputs.
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    args = [str(BIN / "dvc"), "exp", "run", "-S", "evaluate.batch_size=0", "-S", "train.lr=0.5"]
    try:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    finally:
        run(["git", "checkout", "--", "params.yaml"], repo)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "evaluate.batch_size: expected a number at least 1, found 0" in output
    assert ran_stages(output) == {"check"}  # train.lr changed too, yet train did not start
    assert changed_stages(repo) == set()


def test_code_edits_invalidate_only_the_stages_that_run_the_code(repo):
    builder, scoring = repo / "pipeline" / "features" / "build.py", repo / "pipeline" / "metrics.py"
    originals = {path: path.read_text() for path in (builder, scoring)}
    try:
        builder.write_text(originals[builder] + "# a comment in the features builder\n")
        assert changed_stages(repo) == {"features"}  # train reads the cache, not its builder
        builder.write_text(originals[builder])
        scoring.write_text(originals[scoring] + "# a comment in the metric code\n")
        assert changed_stages(repo) == {"train", "evaluate"}  # dev F1 selects the checkpoint
    finally:
        for path, text in originals.items():
            path.write_text(text)
    assert changed_stages(repo) == set()


def test_exp_run_with_override_and_clean_status(repo):
    dvc(repo, "exp", "run", "-S", "train.epochs=1")
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"] == 1
    metrics = json.loads((repo / "metrics" / "test.json").read_text())
    assert "micro_f1" in metrics and "by_pair_kind" in metrics
    shown = dvc(repo, "exp", "show", "--md")
    assert "micro_f1" in shown and "train.epochs" in shown
    assert changed_stages(repo) == set()
    # `compare` reads the real `dvc.api.exp_show()`: the commit and the experiment, one row each.
    table = run([str(BIN / "python"), "-m", "stages", "compare", "-m", "micro_f1"], repo)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`baseline`", "`train.epochs=1`"], table
    assert f"{metrics['micro_f1']:.3f}" in rows[1]


def test_checkout_returns_to_the_commit_without_retraining(repo):
    # After a workspace experiment: the README's command restores the commit's params and
    # outputs, the trained model included (models/selected is cached; the uncached resumable
    # checkpoint is no output), so nothing is out of date.
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results"], repo)  # dvc.lock, metrics and logs, as a user would
    dvc(repo, "exp", "run", "-S", "train.lr=0.004")
    assert changed_stages(repo) == set()  # the experiment's own state
    run(["git", "checkout", "--", "params.yaml", "dvc.lock", "dvclive", "metrics", "plots"], repo)
    dvc(repo, "checkout")
    assert changed_stages(repo) == set()
    assert stages_to_rerun(repo) == set()
    committed = run(["git", "show", "HEAD:metrics/test.json"], repo)
    assert json.loads((repo / "metrics" / "test.json").read_text()) == json.loads(committed)
