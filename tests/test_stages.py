"""What every writing stage shares: one writer per output (a lock naming its holder), and a clear
error before any work when an output cannot be written."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import held_locks
from typer.testing import CliRunner

from pipeline.config import default_params, params_to_dict
from pipeline.io import DataError, StaleCacheError
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "data.synthetic.train": 6,
    "data.synthetic.valid": 3,
    "data.synthetic.test": 3,
    "data.synthetic.image_size": 48,
}


def _download(tmp_path: Path, out: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_to_dict(default_params(TINY))))
    args = ["download", "--params", str(params), "--out", str(out), "--cache", str(tmp_path / "c")]
    return CliRunner().invoke(app, args)


def _hold(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s lock until killed."""
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from pathlib import Path; from stages.common import writing_outputs\n"
            f"with writing_outputs(Path({str(out)!r})):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    if holder.stdout.readline().strip() != "held":
        holder.kill()
        holder.wait()
        raise AssertionError(f"the lock holder exited with {holder.returncode} before holding")
    return holder


def test_a_second_writer_is_refused_and_told_who_holds_the_output(tmp_path):
    out = tmp_path / "raw"
    holder = _hold(out)
    try:
        result = _download(tmp_path, out)
        assert result.exit_code == 1
        assert f"{out}: another run (pid {holder.pid}) is writing it" in result.output
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, not released): its lock went with it.
    result = _download(tmp_path, out)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "ro" / "raw"
    out.parent.mkdir()
    real_access = os.access
    # Tests may run as root, for whom chmod does not forbid writing: ask os.access instead.
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == out.parent else real_access(p, mode)
    )
    result = _download(tmp_path, out)
    assert result.exit_code == 1
    assert f"error: {out.parent}: not writable (this stage writes {out})" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "stage", ["download", "depth", "caption", "features", "train", "evaluate", "predict"]
)
def test_every_writing_stage_takes_its_output_lock(stage):
    source = (REPO / "stages" / f"{stage}.py").read_text()
    assert "writing_outputs(" in source


def _check(tmp_path: Path, tree: dict):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    return CliRunner().invoke(app, ["check", "--params", str(params)]), params


def test_check_passes_the_shipped_params(tmp_path):
    result, params = _check(tmp_path, params_to_dict(default_params()))
    assert result.exit_code == 0, result.output
    assert f"{params}: valid" in result.output


def test_check_refuses_a_key_no_stage_lists(tmp_path):
    # A typo that no stage's params list holds: only `check` sees it before `dvc exp run` succeeds.
    tree = params_to_dict(default_params())
    tree["train"]["epoch"] = 3
    result, params = _check(tmp_path, tree)
    assert result.exit_code == 2
    assert f"error: {params}: train.epoch: unknown key" in result.output


def test_check_reports_each_setting_that_cannot_run_with_the_others(tmp_path):
    tree = params_to_dict(default_params({"data.source": "umre", "model.ot.kernel_floor": 0.0}))
    result, params = _check(tmp_path, tree)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert [e.split(": ")[2] for e in errors] == ["depth.source", "model.ot.kernel_floor"]
    assert all(e.startswith(f"error: {params}: ") for e in errors)


def test_an_interrupted_train_says_how_to_resume(tmp_path, monkeypatch):
    import pipeline.train.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.train.loop, "train", interrupted)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_to_dict(default_params(TINY))))
    out = tmp_path / "models"
    args = ["train", "--params", str(params), "--features", str(tmp_path / "f")]
    args += ["--dataset", str(tmp_path / "raw"), "--out", str(out), "--live", str(tmp_path / "l")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert "train: interrupted; rerun the same command (or dvc repro) to resume" in result.output
    assert str(out / "checkpoint") in result.output


def test_processes_a_stage_launched_write_under_its_locks(tmp_path, monkeypatch):
    from stages.common import LOCKS_HELD_ENV, OutputBusyError, writing_outputs

    out = tmp_path / "models"
    holder = _hold(out)
    try:
        with pytest.raises(OutputBusyError), writing_outputs(out):
            pass
        # What train's torchrun children see: their parent holds the locks for them.
        monkeypatch.setenv(LOCKS_HELD_ENV, "1")
        with writing_outputs(out):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_evaluate_passes_its_params_and_locks_every_output(tmp_path, monkeypatch):
    import pipeline.device
    import pipeline.evaluate.report

    tree = params_to_dict(default_params(TINY))
    tree["evaluate"]["batch_size"] = 7
    tree["train"]["threads"] = 3
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    seen = {}

    def fake_evaluate(model, features, metrics, plots, live, batch_size, **kwargs):
        outs = (metrics, plots, kwargs["release_dir"])
        locked = held_locks(tmp_path, [f".{out.name}.lock" for out in outs])
        seen.update(batch_size=batch_size, locked=locked, dataset=kwargs["dataset_dir"])
        return {
            "micro_f1": 0.5,
            "micro_precision": 0.25,
            "micro_recall": 1.0,
            "accuracy": 0.75,
            "macro_f1": None,
            "by_pair_kind": {
                "text-text": {"micro_f1": 0.5, "support": 4},
                "object-object": {"micro_f1": None, "support": 0},
            },
        }

    monkeypatch.setattr(pipeline.evaluate.report, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(pipeline.device, "set_tf32", lambda enabled: None)
    monkeypatch.setattr(
        pipeline.device,
        "set_determinism",
        lambda threads, deterministic: seen.update(threads=threads),
    )
    args = ["evaluate", "--params", str(params), "--features", str(tmp_path / "f")]
    args += ["--model", str(tmp_path / "selected"), "--live", str(tmp_path / "live")]
    for name in ("metrics", "plots", "release", "dataset"):
        args += [f"--{name}", str(tmp_path / name)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == {
        "threads": 3,  # scored with the training run's threads
        "batch_size": 7,
        "locked": [".metrics.lock", ".plots.lock", ".release.lock"],
        "dataset": tmp_path / "dataset",
    }
    assert result.output.strip() == (
        "evaluate: test micro-F1 0.5000 (P 0.2500, R 1.0000), accuracy 0.7500, macro-F1 n/a; "
        "by pair kind: text-text 0.5000 (n=4), object-object n/a (n=0)"
    )


@pytest.mark.parametrize(
    "error",
    [
        DataError("records.jsonl:3: bad span"),
        StaleCacheError("stale features"),
        FileNotFoundError("no such file: x"),
        ValueError("bad value"),
    ],
)
def test_a_user_error_becomes_one_line_and_exit_code_1(error):
    import typer

    from stages.common import reported_errors

    def stage():
        with reported_errors():
            raise error

    command = typer.Typer()
    command.command()(stage)
    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == f"error: {error}\n"


def test_any_other_error_keeps_its_traceback():
    from stages.common import reported_errors

    with pytest.raises(KeyError), reported_errors():
        raise KeyError("a bug")


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    from stages.common import writing_outputs

    out = tmp_path / "out"
    with writing_outputs(out):
        assert held_locks(tmp_path, [".out.lock"]) == [".out.lock"]
    assert held_locks(tmp_path, [".out.lock"]) == []
    with pytest.raises(RuntimeError), writing_outputs(out):
        raise RuntimeError("a failing stage")
    assert held_locks(tmp_path, [".out.lock"]) == []


def test_a_process_other_than_rank_0_takes_no_lock(tmp_path, monkeypatch):
    import stages.common
    from stages.common import writing_outputs

    monkeypatch.setattr(stages.common, "_launch_position", lambda: (1, 2))
    with writing_outputs(tmp_path / "out"):
        assert held_locks(tmp_path, [".out.lock"]) == []


def test_an_output_folder_that_cannot_be_entered_or_an_unwritable_output_is_refused(
    tmp_path, monkeypatch
):
    from stages.common import writing_outputs

    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    real_access = os.access
    denied = {}  # path -> the access bits refused on it

    def access(path, mode):
        return not mode & denied.get(Path(path), 0) and real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    for path, bits in [(out.parent, os.X_OK), (out, os.W_OK), (out, os.X_OK)]:
        denied.clear()
        denied[path] = bits
        with pytest.raises(PermissionError) as error, writing_outputs(out):
            pass
        assert str(error.value) == f"{path}: not writable (this stage writes {out})"


def test_the_shard_comes_from_the_launcher_unless_given(monkeypatch):
    import typer

    import pipeline.device
    from stages.common import resolve_shard

    assert resolve_shard(None, None) == (0, 1)  # no launcher: the whole job
    monkeypatch.setattr(pipeline.device, "is_distributed_launch", lambda: True)
    monkeypatch.setattr(
        pipeline.device,
        "process_state",
        lambda: type("State", (), {"process_index": 1, "num_processes": 3})(),
    )
    assert resolve_shard(None, None) == (1, 3)
    assert resolve_shard(2, None) == (2, 3)
    assert resolve_shard(None, 4) == (1, 4)
    assert resolve_shard(0, 1) == (0, 1)
    for shard, num_shards in [(-1, 3), (3, 3)]:
        with pytest.raises(typer.Exit) as exit_:
            resolve_shard(shard, num_shards)
        assert exit_.value.exit_code == 2


def test_the_cli_has_every_documented_command_and_shows_help_without_one():
    from typer.main import get_command

    commands = get_command(app).commands
    assert list(commands) == [
        "check",
        "download",
        "depth",
        "caption",
        "features",
        "train",
        "evaluate",
        "predict",
        "preset",
        "compare",
    ]
    result = CliRunner().invoke(app, [])
    assert "Usage:" in result.output and "compare" in result.output
    assert "Missing command" not in result.output


def test_help_texts_are_reflowed_but_keep_paragraphs_and_indented_lines():
    from stages.cli import reflowed

    doc = """First line
        goes on.

        Second paragraph,
        wrapped:
          indented command --flag
        after it
        more.
        """
    assert reflowed(doc) == (
        "First line goes on.\n\nSecond paragraph, wrapped:\n  indented command --flag\n"
        "after it more."
    )
    assert reflowed(None) == ""


def test_the_command_list_shows_each_summary_unbroken():
    from stages import check

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    summary = " ".join(inspect.cleandoc(check.main.__doc__).split())
    assert summary in " ".join(result.output.split())  # the words, in order
    row = next(line for line in result.output.splitlines() if line.startswith("│ check "))
    # The whole summary (141 characters) sits on the command's own row at this width.
    assert row.rstrip(" │").endswith(summary[-40:])


def test_every_command_first_sets_up_the_process(tmp_path, monkeypatch):
    import pipeline.device

    calls = []
    monkeypatch.setattr(pipeline.device, "keep_freed_memory", lambda: calls.append(1))
    result, _ = _check(tmp_path, params_to_dict(default_params()))
    assert result.exit_code == 0 and calls == [1]


def test_workers_of_one_sharded_stage_lock_their_own_part(tmp_path):
    from stages.common import OutputBusyError, writing_outputs

    out = tmp_path / "depth"
    with writing_outputs(out, part="shard-0-of-2"):
        assert held_locks(tmp_path, [".depth.shard-0-of-2.lock", ".depth.lock"]) == [
            ".depth.shard-0-of-2.lock"
        ]
        # Another shard of the same output runs beside it; the same shard again is refused.
        with writing_outputs(out, part="shard-1-of-2"):
            assert held_locks(tmp_path, [".depth.shard-1-of-2.lock"]) == [
                ".depth.shard-1-of-2.lock"
            ]
        with (
            pytest.raises(OutputBusyError, match="shard-0-of-2.lock"),
            writing_outputs(out, part="shard-0-of-2"),
        ):
            pass


def test_no_shards_is_a_usage_error(monkeypatch):
    import typer

    import pipeline.device
    from stages.common import resolve_shard

    monkeypatch.setattr(pipeline.device, "is_distributed_launch", lambda: True)
    monkeypatch.setattr(
        pipeline.device,
        "process_state",
        lambda: type("State", (), {"process_index": 0, "num_processes": 3})(),
    )
    # --num-shards 0 is given, not absent: it does not fall back to the launcher's 3.
    for shard, num_shards in [(0, 0), (None, 0)]:
        with pytest.raises(typer.Exit) as exit_:
            resolve_shard(shard, num_shards)
        assert exit_.value.exit_code == 2


def test_logging_keeps_accelerates_per_file_messages_out(monkeypatch):
    import logging

    from stages.common import setup_logging

    accelerate = logging.getLogger("accelerate")
    before = accelerate.level
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # leave the root alone
    try:
        accelerate.setLevel(logging.NOTSET)
        setup_logging()
        assert accelerate.level == logging.WARNING
    finally:
        accelerate.setLevel(before)  # setLevel, not an attribute: it clears the level cache
