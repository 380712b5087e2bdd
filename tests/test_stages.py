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


# ---------------------------------------------------------------------------------------------
# What each stage command hands its pipeline function, and what it reports back (the pipeline
# functions replaced by fakes that record their arguments).


def _params_file(tmp_path: Path, **overrides) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_to_dict(default_params({**TINY, **overrides}))))
    return params


def _messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def _launched_as(monkeypatch, rank: int, world: int) -> None:
    """This process as rank ``rank`` of ``world`` under a launcher (it then takes no locks)."""
    import stages.common

    monkeypatch.setattr(stages.common, "_launch_position", lambda: (rank, world))


def test_download_hands_over_its_folders_and_logs_each_split(tmp_path, monkeypatch, caplog):
    import logging

    import pipeline.data.prepare

    seen = {}

    def fake_prepare(params, out, cache):
        seen.update(source=params.data.source, out=out, cache=cache)
        train = {
            "samples": 4,
            "images": 3,
            "pair_kinds": {"text-text": 2, "text-object": 1, "object-object": 1},
            "relations": {"none": 1, "/per/per/self": 3},
        }
        test = {"samples": 2, "images": 2, "pair_kinds": {"text-text": 2}, "relations": {"a": 2}}
        return {"images": 5, "splits": {"train": train, "test": test}, "skipped": {"records": 2}}

    monkeypatch.setattr(pipeline.data.prepare, "prepare_dataset", fake_prepare)
    caplog.set_level(logging.INFO)
    out = tmp_path / "raw"
    result = _download(tmp_path, out)
    assert result.exit_code == 0, result.output
    assert seen == {"source": "synthetic", "out": out, "cache": tmp_path / "c"}
    assert _messages(caplog, "stages.download") == [
        "train: 4 samples (text-text 2, text-object 1, object-object 1; none 1), 3 images",
        "test: 2 samples (text-text 2; none 0), 2 images",
        f"wrote {out} (source synthetic, 5 images, 2 records skipped)",
    ]


def _depth_result(**kwargs):
    from pipeline.depth.run import DepthRunResult

    return DepthRunResult(**kwargs)


def test_depth_takes_the_launchers_shard_and_hands_over_its_progress_option(tmp_path, monkeypatch):
    import pipeline.data.records
    import pipeline.depth.run

    seen = []

    def fake_run(ds, out_dir, depth, on_error, shard, num_shards, progress):
        seen.append((shard, num_shards, progress))
        skipped = [{"image_id": "a.jpg", "reason": "x"}, {"image_id": "b.jpg", "reason": "y"}]
        return _depth_result(
            total_shards=4, shards_computed=[1, 3], images_computed=5, skipped=skipped,
            complete=True,
        )  # fmt: skip

    monkeypatch.setattr(pipeline.depth.run, "run_depth", fake_run)
    monkeypatch.setattr(pipeline.data.records, "Dataset", lambda path: path)
    _launched_as(monkeypatch, 1, 3)
    out = tmp_path / "depth"
    args = ["depth", "--params", str(_params_file(tmp_path)), "--dataset", str(tmp_path / "raw")]
    args += ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"depth: computed 5 images in 2 of 4 shards, skipped 2; store {out} complete\n"
    )
    result = CliRunner().invoke(app, [*args, "--shard", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    # Without the options: the launcher's rank and world size; a given option wins.
    assert seen == [(1, 3, True), (0, 3, False)]


def test_caption_takes_the_launchers_shard_and_logs_what_it_made(tmp_path, monkeypatch, caplog):
    import logging

    import pipeline.caption.run
    import pipeline.data.records

    seen = []
    summaries = [
        {"items": 5, "generated": 2, "missing": 3},  # a shard's run: others still missing
        {
            "backend": "mllm",
            "captions": 10,
            "filled": 1,
            "coverage": {
                "found": 9,
                "total": 10,
                "entities": {"found": 6, "total": 6},
                "objects": {"found": 3, "total": 4},
            },
        },
    ]
    summaries.append({**summaries[1], "backend": "file", "filled": 0})

    def fake_run(ds, out, params, *, shard, num_shards, progress):
        seen.append((shard, num_shards, progress))
        return summaries[len(seen) - 1]

    monkeypatch.setattr(pipeline.caption.run, "run_caption", fake_run)
    monkeypatch.setattr(pipeline.data.records, "Dataset", lambda path: path)
    _launched_as(monkeypatch, 1, 3)
    caplog.set_level(logging.INFO)
    out = tmp_path / "captions"
    args = ["caption", "--params", str(_params_file(tmp_path)), "--dataset", str(tmp_path / "raw")]
    args += ["--out", str(out)]
    for extra in ([], ["--no-progress"], ["--shard", "0", "--num-shards", "1"]):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
    assert seen == [(1, 3, True), (1, 3, False), (0, 1, True)]
    assert _messages(caplog, "stages.caption") == [
        "shard 1/3: 5 item(s), 2 generated now; 3 item(s) of other shards missing",
        f"{out}: backend mllm, 10 caption(s); coverage 9/10 (entities 6/6, objects 3/4), "
        "1 filled empty",
        f"{out}: backend file, 10 caption(s); coverage 9/10 (entities 6/6, objects 3/4)",
    ]


def test_features_reports_each_split(tmp_path, monkeypatch):
    import pipeline.data.records
    import pipeline.features.build

    def fake_build(dataset, out, params, depth, captions, *, input_paths=()):
        def split(samples, images, dropped, problems):
            return {
                "samples": samples,
                "images": images,
                "samples_with_dropped_markers": dropped,
                "image_problems": {"count": problems},
            }

        return {"splits": {"train": split(6, 4, 2, 1), "valid": split(3, 2, 0, 0)}}

    monkeypatch.setattr(pipeline.features.build, "build_features", fake_build)
    monkeypatch.setattr(pipeline.data.records, "Dataset", lambda path: path)
    params = _params_file(tmp_path, **{"data.use_depth": False, "data.use_caption": False})
    out = tmp_path / "features"
    args = ["features", "--params", str(params), "--out", str(out)]
    for name in ("dataset", "depth", "captions"):
        args += [f"--{name}", str(tmp_path / name)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "features train: 6 samples, 4 images, 2 with markers lost to truncation, 1 image problems",
        "features valid: 3 samples, 2 images, 0 with markers lost to truncation, 0 image problems",
        f"features: wrote {out} (report: {out / 'report.json'})",
    ]


def _train_args(tmp_path: Path, params: Path) -> list[str]:
    args = ["train", "--params", str(params), "--features", str(tmp_path / "f")]
    return args + ["--dataset", str(tmp_path / "raw"), "--out", str(tmp_path / "models"),
                   "--live", str(tmp_path / "live")]  # fmt: skip


def test_a_relaunched_train_fails_with_its_processes_exit_code_and_holds_both_locks(
    tmp_path, monkeypatch
):
    import subprocess as sp

    from stages.common import LOCKS_HELD_ENV

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(LOCKS_HELD_ENV, raising=False)
    seen = {}

    def failed_launch(cmd, check, env):
        seen.update(check=check, locked=held_locks(tmp_path, [".models.lock", ".live.lock"]))
        if check:
            raise sp.CalledProcessError(3, cmd)
        return sp.CompletedProcess(cmd, 3)

    monkeypatch.setattr(sp, "run", failed_launch)
    params = _params_file(tmp_path, **{"train.num_processes": 2})
    result = CliRunner().invoke(app, _train_args(tmp_path, params))
    # A failed run of the launched processes fails the stage, with their exit code (for dvc).
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit)
    assert seen == {"check": False, "locked": [".models.lock", ".live.lock"]}


class _Trained:
    """What train() returns, as far as the stage reads it."""

    def __init__(self, tmp_path: Path, **kwargs):
        self.best_score, self.best_epoch = 0.123456, 4
        self.stopped_early, self.resumed_from_epoch = False, 0
        self.best_dir = tmp_path / "models" / "selected"
        self.__dict__.update(kwargs)


def _fake_train(monkeypatch, results: list, main_process: bool = True) -> list:
    import pipeline.device
    import pipeline.train.loop

    calls = []

    def fake_train(p, features, dataset, out, live):
        calls.append((p.train.num_processes, features, dataset, out, live))
        return results[len(calls) - 1]

    monkeypatch.setattr(pipeline.train.loop, "train", fake_train)
    state = type("State", (), {"is_main_process": main_process})()
    monkeypatch.setattr(pipeline.device, "process_state", lambda: state)
    return calls


def test_train_says_where_its_best_dev_model_is(tmp_path, monkeypatch):
    results = [
        _Trained(tmp_path),
        _Trained(tmp_path, stopped_early=True, resumed_from_epoch=2, best_score=0.5),
    ]
    calls = _fake_train(monkeypatch, results)
    args = _train_args(tmp_path, _params_file(tmp_path))
    outputs = [CliRunner().invoke(app, args).output for _ in results]
    selected = tmp_path / "models" / "selected"
    assert outputs == [
        f"train: best dev micro-F1 0.1235 at epoch 4; wrote {selected}\n",
        f"train: best dev micro-F1 0.5000 at epoch 4 (early stop), resumed after epoch 2; "
        f"wrote {selected}\n",
    ]
    paths = (tmp_path / "f", tmp_path / "raw", tmp_path / "models", tmp_path / "live")
    assert calls == [(1, *paths)] * 2


def test_train_inside_a_launch_trains_in_place_and_only_the_main_process_reports(
    tmp_path, monkeypatch
):
    import subprocess as sp

    # Under accelerate launch or torchrun (WORLD_SIZE set), train.num_processes > 1 is this
    # launch: the stage trains here instead of launching again.
    monkeypatch.setenv("WORLD_SIZE", "2")
    _launched_as(monkeypatch, 1, 2)
    monkeypatch.setattr(sp, "run", lambda *a, **k: pytest.fail("launched again inside a launch"))
    calls = _fake_train(monkeypatch, [_Trained(tmp_path)], main_process=False)
    params = _params_file(tmp_path, **{"train.num_processes": 2})
    result = CliRunner().invoke(app, _train_args(tmp_path, params))
    assert result.exit_code == 0, result.output
    assert [c[0] for c in calls] == [2]
    assert result.output == ""  # another process than the main one says nothing


def test_train_says_when_a_world_size_of_one_keeps_it_from_launching(tmp_path, monkeypatch, caplog):
    import subprocess as sp

    # WORLD_SIZE=1 left exported in a shell looks like a launch of one process.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(sp, "run", lambda *a, **k: pytest.fail("launched inside a launch"))
    calls = _fake_train(monkeypatch, [_Trained(tmp_path)])
    params = _params_file(tmp_path, **{"train.num_processes": 4})
    with caplog.at_level("WARNING", logger="stages.train"):
        result = CliRunner().invoke(app, _train_args(tmp_path, params))
    assert result.exit_code == 0, result.output
    assert [c[0] for c in calls] == [4]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "train.num_processes is 4, but WORLD_SIZE=1 is set (a launcher's, or left exported in "
        "this shell): training in this one process; unset WORLD_SIZE to have the stage launch 4"
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real launch of two: nothing to say
    caplog.clear()
    _launched_as(monkeypatch, 0, 2)
    _fake_train(monkeypatch, [_Trained(tmp_path)])
    with caplog.at_level("WARNING", logger="stages.train"):
        CliRunner().invoke(
            app, _train_args(tmp_path, _params_file(tmp_path, **{"train.num_processes": 2}))
        )
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _fake_evaluate(monkeypatch, tmp_path, seen: dict) -> None:
    import pipeline.device
    import pipeline.evaluate.report

    def fake_evaluate(model, features, metrics, plots, live, batch_size, **kwargs):
        names = [f".{name}.lock" for name in ("metrics", "plots", "release")]
        seen.update(locked=held_locks(tmp_path, names), release=kwargs["release_dir"])
        return {
            "micro_f1": 0.5,
            "micro_precision": 0.25,
            "micro_recall": 1.0,
            "accuracy": 0.75,
            "macro_f1": 0.125,
            "by_pair_kind": {"text-text": {"micro_f1": 0.5, "support": 4}},
        }

    monkeypatch.setattr(pipeline.evaluate.report, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(pipeline.device, "set_tf32", lambda enabled: seen.update(tf32=enabled))
    monkeypatch.setattr(
        pipeline.device,
        "set_determinism",
        lambda threads, deterministic: seen.update(deterministic=deterministic),
    )


def test_evaluate_scores_with_the_training_runs_settings_and_needs_no_release(
    tmp_path, monkeypatch
):
    seen = {}
    _fake_evaluate(monkeypatch, tmp_path, seen)
    overrides = {"train.deterministic": False, "train.tf32": False}
    args = ["evaluate", "--params", str(_params_file(tmp_path, **overrides))]
    for name in ("features", "model", "metrics", "plots", "live"):
        args += [f"--{name}", str(tmp_path / name)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # Without --release: only the metrics and plots are written (and locked).
    assert seen == {
        "deterministic": False,
        "tf32": False,
        "locked": [".metrics.lock", ".plots.lock"],
        "release": None,
    }
    assert result.output.strip() == (
        "evaluate: test micro-F1 0.5000 (P 0.2500, R 1.0000), accuracy 0.7500, macro-F1 0.1250; "
        "by pair kind: text-text 0.5000 (n=4)"
    )
    seen.clear()
    _params_file(tmp_path, **{"train.deterministic": True, "train.tf32": True})
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (seen["deterministic"], seen["tf32"]) == (True, True)


def test_predict_hands_over_its_batch_size_holds_its_output_and_counts_the_lines(
    tmp_path, monkeypatch
):
    import pipeline.predict

    seen = []

    def fake_predict(model, input, output, batch_size):
        seen.append((model, input, output, batch_size, held_locks(tmp_path, [".out.jsonl.lock"])))
        return [{"line": 1}, {"line": 2}, {"line": 3}]

    monkeypatch.setattr(pipeline.predict, "predict_file", fake_predict)
    paths = {name: tmp_path / name for name in ("model", "in.jsonl", "out.jsonl")}
    args = ["predict", "--model", str(paths["model"]), "--input", str(paths["in.jsonl"])]
    args += ["--output", str(paths["out.jsonl"])]
    for extra in ([], ["--batch-size", "5"]):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        assert result.output == f"predict: labelled 3 inputs -> {paths['out.jsonl']}\n"
    locked = [".out.jsonl.lock"]
    assert seen == [(*paths.values(), 64, locked), (*paths.values(), 5, locked)]


@pytest.mark.parametrize(
    "stage, options",
    [
        ("download", ["out", "cache"]),
        ("depth", ["dataset", "out"]),
        ("caption", ["dataset", "out"]),
        ("features", ["dataset", "depth", "captions", "out"]),
        ("train", ["features", "dataset", "out", "live"]),
        ("evaluate", ["features", "model", "metrics", "plots", "live"]),
    ],
)
def test_a_stage_given_bad_params_says_so_in_one_line_with_exit_code_2(tmp_path, stage, options):
    tree = params_to_dict(default_params(TINY))
    tree["train"]["epoch"] = 3
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    args = [stage, "--params", str(params)]
    for name in options:
        args += [f"--{name}", str(tmp_path / name)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"error: {params}: train.epoch: unknown key (known keys")
    assert result.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written
