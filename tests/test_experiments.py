"""Seed summaries of `dvc.api.exp_show()` rows: grouping, labels, statistics, skipped rows."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from pipeline.experiments import (
    finished_runs,
    left_out_states,
    param_values,
    saved_rows,
    seed_summary,
    summary_markdown,
)
from pipeline.io import DataError
from stages import compare

PARAMS = ["train.seed", "train.lr", "data.use_depth"]


def _row(
    name: str | None,
    seed: int,
    depth: bool,
    f1: float | None,
    rev: str = "abc1234",
    typ: str = "branch_commit",
    state: str | None = None,
) -> dict:
    """One row as dvc.api.exp_show() gives it: numbers as floats, booleans as text, None if
    missing."""
    return {
        "Experiment": name,
        "rev": rev,
        "typ": typ,
        "Created": "04:00 AM",
        "parent": None,
        "State": state,
        "Executor": "Dvc-task" if state in ("Queued", "Running") else None,
        "micro_f1": f1,
        "by_pair_kind.text-text.micro_f1": None if f1 is None else f1 / 2,
        "train.seed": float(seed),
        "train.lr": 0.002,
        "data.use_depth": str(depth),
        "pipeline/train": "5f3a9c0e",
    }


ROWS = [
    _row(None, 1234, True, 0.5, rev="workspace", typ="baseline"),
    _row(None, 1234, True, 0.80, rev="main", typ="baseline"),
    _row("base-seed1", 1, True, 0.90),
    _row("no-depth", 1234, False, 0.70, state="Success"),
    _row("no-depth-seed1", 1, False, 0.60),
    _row("no-depth-seed2", 2, False, 0.65),
    _row("running", 3, False, 0.99, state="Running"),
    _row("queued", 5, False, None, state="Queued"),
    _row("failed", 4, False, 0.5, typ="branch_base", state="Failed"),
]
METRICS = ["micro_f1", "by_pair_kind.text-text.micro_f1", "missing"]


def _summary(rows: list[dict], metrics: list[str] = METRICS) -> list[dict]:
    return seed_summary(finished_runs(rows, PARAMS, metrics), metrics)


def test_leaves_out_the_workspace_and_unfinished_experiments():
    runs = finished_runs(ROWS, PARAMS, METRICS)
    assert runs["run", "name"].tolist() == [
        "main",
        "base-seed1",
        "no-depth",
        "no-depth-seed1",
        "no-depth-seed2",
    ]
    assert runs["run", "baseline"].tolist() == [True, False, False, False, False]
    assert runs["params", "train.seed"].tolist() == [1234, 1, 1234, 1, 2]
    assert math.isnan(runs["metrics", "missing"].iloc[0])


def test_groups_by_params_other_than_the_seed_and_labels_by_difference():
    rows = _summary(ROWS)
    assert [r["configuration"] for r in rows] == ["baseline", "data.use_depth=False"]
    base, no_depth = rows
    assert base["seeds"] == [1, 1234] and no_depth["seeds"] == [1, 2, 1234]
    mean, std, n = no_depth["micro_f1"]
    assert n == 3 and mean == pytest.approx(0.65)
    assert std == pytest.approx(statistics.stdev([0.70, 0.60, 0.65]))
    assert base["by_pair_kind.text-text.micro_f1"][0] == pytest.approx(0.425)
    assert base["missing"][2] == 0 and math.isnan(base["missing"][0])


def test_a_commit_repeated_by_an_experiment_counts_once():
    rows = [*ROWS[:2], _row("same", 1234, True, 0.80)]
    (summary,) = _summary(rows, ["micro_f1"])
    assert summary["micro_f1"][2] == 1 and summary["runs"] == ["main"]


def test_markdown_shows_mean_and_spread():
    rows = _summary(ROWS, ["micro_f1", "missing"])
    table = summary_markdown(rows, ["micro_f1", "missing"]).splitlines()
    assert table[0] == (
        "| configuration | seeds | micro_f1 | missing | Δ micro_f1 vs baseline, paired by seed |"
    )
    assert table[2] == "| `baseline` | 1, 1234 | 0.850 ± 0.071 | – | – |"
    assert table[3] == (
        "| `data.use_depth=False` | 1, 2, 1234 | 0.650 ± 0.050 | – | -0.200 ± 0.141 (n=2) |"
    )


def test_paired_difference_uses_only_seeds_both_configurations_ran():
    base, no_depth = _summary(ROWS, ["micro_f1"])
    assert base["paired"]["micro_f1"][2] == 0
    mean, std, n = no_depth["paired"]["micro_f1"]
    # Seed 2 has no baseline partner; seeds 1 and 1234 give 0.60 - 0.90 and 0.70 - 0.80.
    assert n == 2
    assert mean == pytest.approx(-0.20)
    assert std == pytest.approx(statistics.stdev([-0.30, -0.10]))
    # The paired spread removes what the seeds share: here a per-seed offset.
    shifted = [_row(None, 1, True, 0.90, rev="main", typ="baseline")]
    shifted += [_row(f"s{seed}", seed, True, f1) for seed, f1 in [(2, 0.70), (3, 0.80)]]
    shifted += [
        _row(f"d{seed}", seed, False, f1 - 0.05) for seed, f1 in [(1, 0.90), (2, 0.70), (3, 0.80)]
    ]
    base, no_depth = _summary(shifted, ["micro_f1"])
    assert base["micro_f1"][1] == pytest.approx(0.1)
    mean, std, n = no_depth["paired"]["micro_f1"]
    assert (n, mean) == (3, pytest.approx(-0.05)) and std == pytest.approx(0.0, abs=1e-12)


def test_reads_the_params_and_test_metrics_columns_where_files_share_a_key():
    # dvclive's metrics hold a `train.lr` and a `micro_f1` too: exp_show then prefixes the file.
    rows = [
        {
            "typ": "baseline" if name == "main" else "branch_commit",
            "rev": name,
            "Experiment": None if name == "main" else name,
            "metrics/test.json:micro_f1": f1,
            "dvclive/metrics.json:micro_f1": 0.0,
            "dvclive/metrics.json:train.lr": 0.0,
            "train.seed": seed,
            "params.yaml:train.lr": lr,
        }
        for name, seed, lr, f1 in [("main", 1, 0.1, 0.8), ("e1", 2, 0.1, 0.6), ("e2", 1, 0.05, 0.7)]
    ]
    base, low_lr = seed_summary(
        finished_runs(rows, ["train.seed", "train.lr"], ["micro_f1"]), ["micro_f1"]
    )
    assert (base["configuration"], low_lr["configuration"]) == ("baseline", "train.lr=0.05")
    assert base["micro_f1"][0] == pytest.approx(0.7) and base["seeds"] == [1, 2]
    mean, std, n = low_lr["paired"]["micro_f1"]
    assert (n, mean) == (1, pytest.approx(-0.1)) and math.isnan(std)


def test_saved_csv_and_json_rows_give_the_same_summary(tmp_path):
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(ROWS))
    # `dvc exp show --csv`: every cell as text, an empty cell where a value is missing.
    as_csv = tmp_path / "rows.csv"
    with as_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        writer.writeheader()
        for row in ROWS:
            writer.writerow(
                {k: "" if v is None else int(v) if k == "train.seed" else v for k, v in row.items()}
            )
    expected = _summary(ROWS)
    for path in (as_json, as_csv):
        summary = _summary(saved_rows(path))
        assert summary_markdown(summary, METRICS) == summary_markdown(expected, METRICS)
        assert summary[1]["seeds"] == [1, 2, 1234]


def test_saved_nested_exp_show_json_is_refused(tmp_path):
    path = tmp_path / "exp_show.json"
    path.write_text(json.dumps([{"rev": "workspace", "data": {}, "experiments": None}]))
    with pytest.raises(ValueError, match="exp_show"):
        saved_rows(path)


def test_param_values_are_dotted_leaves():
    assert list(param_values({"train": {"seed": 1, "lr": 0.1}, "data": {"use_depth": True}})) == [
        "train.seed",
        "train.lr",
        "data.use_depth",
    ]


def test_a_float_param_keeps_its_form_in_the_label():
    # exp_show gives every number as a float: params.yaml says which are floats (1.0, not 1).
    rows = [
        {"typ": "baseline", "rev": "main", "train.seed": 1.0, "model.ot.epsilon": 0.5},
        {"typ": "branch_base", "Experiment": "e", "train.seed": 1.0, "model.ot.epsilon": 1.0},
    ]
    values = param_values({"train": {"seed": 1234}, "model": {"ot": {"epsilon": 0.5}}})
    runs = finished_runs(rows, values, [])
    assert runs["params"].to_dict("records") == [
        {"train.seed": 1, "model.ot.epsilon": 0.5},
        {"train.seed": 1, "model.ot.epsilon": 1.0},
    ]
    assert isinstance(runs["params", "model.ot.epsilon"].iloc[1], float)
    assert isinstance(runs["params", "train.seed"].iloc[1], int)
    # Without the types, a whole number reads as an int.
    assert finished_runs(rows, list(values), [])["params", "model.ot.epsilon"].iloc[1] == 1


def test_nothing_to_summarize():
    assert _summary([]) == []
    assert _summary(ROWS[:1]) == []
    with pytest.raises(ValueError, match="seed key"):
        seed_summary(finished_runs(ROWS, PARAMS, METRICS), METRICS, seed_key="train.sed")


def _compare(args: list[str], cwd: Path) -> Result:
    app = typer.Typer()
    app.command()(compare.main)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return CliRunner().invoke(app, args)


def test_compare_prints_the_table_of_saved_rows_and_one_line_errors(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {seed: 1, lr: 0.002}\ndata: {use_depth: true}\n")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    result = _compare(["--from-file", "rows.json", "-m", "micro_f1"], tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[3].startswith("| `data.use_depth=False` | 1, 2, 1234 |")
    # tmp_path is no DVC repo: one line, exit code 1, no traceback.
    result = _compare([], tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: dvc exp show: you are not inside of a DVC repository")


def test_compare_names_what_it_left_out_and_metrics_no_run_reports(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {seed: 1, lr: 0.002}\ndata: {use_depth: true}\n")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    result = _compare(["--from-file", "rows.json", "-m", "micro_f1", "-m", "micro_f11"], tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "warning: no run reports the metric 'micro_f11'" in lines[-2]
    assert lines[-1].startswith("note: left out 1 running, 1 queued, 1 failed experiment(s)")
    # Every finished run and a known metric: the table alone.
    finished = [r for r in ROWS if r["State"] in (None, "Success")]
    (tmp_path / "rows.json").write_text(json.dumps(finished))
    result = _compare(["--from-file", "rows.json", "-m", "micro_f1"], tmp_path)
    assert result.exit_code == 0 and result.output.splitlines()[-1].startswith("| `")


def test_compare_reads_the_experiments_of_the_commits_it_is_given(tmp_path, monkeypatch):
    import dvc.api
    from dvc.repo import Repo

    (tmp_path / "params.yaml").write_text("train: {seed: 1, lr: 0.002}\ndata: {use_depth: true}\n")
    asked = []

    def exp_show(repo=None, revs=None, **kwargs):
        asked.append(revs)
        return ROWS

    monkeypatch.setattr(dvc.api, "exp_show", exp_show)
    monkeypatch.setattr(Repo, "find_root", staticmethod(lambda: str(tmp_path)))
    assert _compare(["-m", "micro_f1"], tmp_path).exit_code == 0
    result = _compare(["-m", "micro_f1", "--rev", "abc123", "--rev", "main"], tmp_path)
    assert result.exit_code == 0, result.output
    assert asked == [None, ["abc123", "main"]]  # None: dvc's default, HEAD


def test_configurations_keep_the_order_they_first_appear():
    # Queued as lr first, then depth: the table follows that order, not the labels' alphabet.
    rows = [
        _row(None, 1, True, 0.8, rev="main", typ="baseline"),
        {**_row("lr", 1, True, 0.7), "train.lr": 0.001},
        _row("no-depth", 1, False, 0.6),
        {**_row("lr-seed2", 2, True, 0.5), "train.lr": 0.001},
    ]
    summary = _summary(rows, ["micro_f1"])
    assert [r["configuration"] for r in summary] == [
        "baseline",
        "train.lr=0.001",
        "data.use_depth=False",
    ]
    assert [r["runs"] for r in summary] == [["main"], ["lr", "lr-seed2"], ["no-depth"]]
    assert summary[1]["micro_f1"][:2] == (pytest.approx(0.6), pytest.approx(0.1414, abs=1e-4))
    assert summary[2]["paired"]["micro_f1"][:1] == (pytest.approx(-0.2),)


def test_a_run_without_one_param_is_its_own_configuration_not_dropped():
    # An experiment from before data.use_depth existed: exp_show has no value for it.
    rows = [_row(None, 1, True, 0.8, rev="main", typ="baseline"), _row("old", 1, True, 0.7)]
    rows[1]["data.use_depth"] = None
    summary = _summary(rows, ["micro_f1"])
    assert [(r["configuration"], r["runs"]) for r in summary] == [
        ("baseline", ["main"]),
        ("data.use_depth=None", ["old"]),
    ]


def test_a_run_from_before_a_param_was_added_has_the_value_it_ran_with():
    # model.depth_embedding came later (pipeline.config.ADDED_PARAMS): older commits and their
    # experiments have no value for it and ran the original's own depth tokens.
    params = [*PARAMS, "model.depth_embedding"]
    rows = [
        _row(None, 1234, True, 0.8, rev="new", typ="baseline"),
        _row(None, 1234, True, 0.8, rev="old", typ="baseline"),
        _row("old-seed1", 1, True, 0.7),
        _row("channel-seed1", 1, True, 0.9),
    ]
    for row, value in zip(rows, ["tokens", None, None, "channel"], strict=True):
        row["model.depth_embedding"] = value
    runs = finished_runs(rows, params, ["micro_f1"])
    assert runs["params", "model.depth_embedding"].tolist() == [
        "tokens",
        "tokens",
        "tokens",
        "channel",
    ]
    summary = seed_summary(runs, ["micro_f1"])
    assert [(r["configuration"], r["runs"]) for r in summary] == [
        ("baseline", ["new", "old-seed1"]),  # the old commit's run is the new one's, counted once
        ("model.depth_embedding=channel", ["channel-seed1"]),
    ]
    mean, _, n = summary[1]["paired"]["micro_f1"]
    assert (mean, n) == (pytest.approx(0.2), 1)


def test_a_boolean_metric_cell_is_no_number():
    rows = [_row(None, 1, True, 0.8, rev="main", typ="baseline")]
    rows[0]["micro_f1"] = True
    assert math.isnan(finished_runs(rows, PARAMS, ["micro_f1"])["metrics", "micro_f1"].iloc[0])


def test_compare_warns_only_for_metrics_no_run_reports_and_fails_on_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {seed: 1, lr: 0.002}\ndata: {use_depth: true}\n")
    finished = [r for r in ROWS if r["State"] in (None, "Success")]
    finished[1] = {**finished[1], "micro_f1": None}  # one run lacks it: still a reported metric
    (tmp_path / "rows.json").write_text(json.dumps(finished))
    result = _compare(["--from-file", "rows.json", "-m", "micro_f1"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    # Only unfinished experiments: nothing to summarize is an error, not an empty table.
    unfinished = [r for r in ROWS if r["State"] not in (None, "Success")]
    (tmp_path / "rows.json").write_text(json.dumps(unfinished))
    result = _compare(["--from-file", "rows.json"], tmp_path)
    assert result.exit_code == 1
    assert "error: no commits or finished experiments with params found" in result.output


def test_markdown_cells_for_one_seed_and_a_gain_and_the_separator_row():
    # One seed: the mean alone (no spread); a paired gain carries its sign.
    rows = [
        _row(None, 1, True, 0.80, rev="main", typ="baseline"),
        _row("s2", 2, True, 0.60),
        _row("d1", 1, False, 0.90),
    ]
    table = summary_markdown(_summary(rows, ["micro_f1"]), ["micro_f1"]).splitlines()
    assert table[1] == "|---|---|---|---|"
    assert table[2] == "| `baseline` | 1, 2 | 0.700 ± 0.141 | – |"
    assert table[3] == "| `data.use_depth=False` | 1 | 0.900 | +0.100 (n=1) |"


def test_a_label_names_every_changed_param_in_alphabetical_order():
    rows = [
        _row(None, 1, True, 0.8, rev="main", typ="baseline"),
        {**_row("both", 1, False, 0.7), "train.lr": 0.001},
    ]
    summary = _summary(rows, ["micro_f1"])
    assert summary[1]["configuration"] == "data.use_depth=False, train.lr=0.001"


def test_commits_first_keeps_the_order_of_many_experiments():
    # More rows than a sort's insertion-sort cutoff (16): only a stable sort keeps the experiments'
    # order behind the commit, and with it the order of configurations and of runs.
    rows = [_row(f"e{i}", i, i % 2 == 0, 0.5 + i / 100) for i in range(1, 24)]
    rows.append(_row(None, 100, True, 0.9, rev="main", typ="baseline"))
    summary = _summary(rows, ["micro_f1"])
    assert [r["configuration"] for r in summary] == ["baseline", "data.use_depth=False"]
    assert summary[0]["runs"] == ["main", *(f"e{i}" for i in range(2, 24, 2))]
    assert summary[1]["runs"] == [f"e{i}" for i in range(1, 24, 2)]


def test_a_none_text_cell_is_a_missing_param():
    # A saved table may spell a missing value "None": the run then has the value it ran with.
    rows = [
        {**_row(None, 1, True, 0.8, rev="main", typ="baseline"), "model.depth_embedding": "tokens"},
        {**_row("old", 2, True, 0.7), "model.depth_embedding": "None"},
    ]
    runs = finished_runs(rows, [*PARAMS, "model.depth_embedding"], ["micro_f1"])
    assert runs["params", "model.depth_embedding"].tolist() == ["tokens", "tokens"]
    nothing = {"typ": "branch_commit", "rev": "x", **dict.fromkeys(PARAMS, "None")}
    assert finished_runs([nothing], PARAMS, ["micro_f1"]).empty


def test_left_out_states_counts_each_state():
    rows = [*ROWS, _row("queued2", 6, False, None, state="Queued")]
    assert left_out_states(rows) == {"Running": 1, "Queued": 2, "Failed": 1}


PARAMS_YAML = "train: {seed: 1, lr: 0.002}\ndata: {use_depth: true}\n"


def test_compare_without_metric_options_shows_the_default_metrics(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS_YAML)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    result = _compare(["--from-file", "rows.json"], tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        "| configuration | seeds | micro_f1 | by_pair_kind.text-text.micro_f1 "
        "| by_pair_kind.text-object.micro_f1 | by_pair_kind.object-object.micro_f1 "
        "| Δ micro_f1 vs baseline, paired by seed |"
    )


def test_compare_reads_the_params_file_it_is_given_and_its_seed_key(tmp_path):
    # No params.yaml in the folder: the keys come from --params. With --seed-key train.lr, the
    # seed is a configuration and the learning rate (one value here) the seed.
    (tmp_path / "other.yaml").write_text(PARAMS_YAML)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    args = ["--from-file", "rows.json", "-m", "micro_f1", "--params", "other.yaml"]
    result = _compare([*args, "--seed-key", "train.lr"], tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    labels = [line.split(" | ")[0] for line in lines[2:] if line.startswith("| `")]
    assert labels == [
        "| `baseline`",
        "| `train.seed=1`",
        "| `data.use_depth=False`",
        "| `data.use_depth=False, train.seed=1`",
        "| `data.use_depth=False, train.seed=2`",
    ]


def test_compare_labels_a_float_param_as_params_yaml_types_it(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {seed: 1}\nmodel: {ot: {epsilon: 0.5}}\n")
    rows = [
        {"typ": "baseline", "rev": "main", "train.seed": 1.0, "model.ot.epsilon": 0.5},
        {"typ": "branch_base", "Experiment": "e", "train.seed": 1.0, "model.ot.epsilon": 1.0},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    result = _compare(["--from-file", "rows.json", "-m", "micro_f1"], tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[3].startswith("| `model.ot.epsilon=1.0` | 1 |")


def test_compare_reports_a_broken_params_file_as_an_error_not_a_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {seed: 1\n")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    result = _compare(["--from-file", "rows.json"], tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    # One line: the file, the line YAML points at, and its problem.
    assert result.output == (
        "error: params.yaml:2: not valid YAML: expected ',' or '}', but got '<stream end>'\n"
    )
    (tmp_path / "params.yaml").write_text("train:\n  seed: 1\n  seed: 2\n")
    result = _compare(["--from-file", "rows.json"], tmp_path)
    assert result.exit_code == 1
    assert result.output.endswith(
        ":3: not valid YAML: duplicate key 'seed' (first given on line 2)\n"
    )


@pytest.mark.parametrize(("document", "found"), [("- a\n", "list"), ("5\n", "int")])
def test_compare_refuses_a_params_file_that_is_no_mapping_in_one_line(tmp_path, document, found):
    (tmp_path / "params.yaml").write_text(document)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    result = _compare(["--from-file", "rows.json"], tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == (
        f"error: params.yaml: expected a mapping at the top level, found {found}\n"
    )


def test_saved_rows_that_are_not_json_name_the_file_and_line(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text('[\n  {"typ": "baseline"},\n  oops\n]')
    with pytest.raises(DataError) as caught:
        saved_rows(path)
    assert str(caught.value) == f"{path}:3: not valid JSON (Expecting value)"


def test_a_csv_name_in_capitals_is_read_as_csv(tmp_path):
    lower, upper = tmp_path / "runs.csv", tmp_path / "RUNS.CSV"
    text = "Experiment,rev,typ,State,metrics/test.json:micro_f1,train.seed\n,main,baseline,,0.5,1\n"
    lower.write_text(text)
    upper.write_text(text)
    assert (
        saved_rows(upper)
        == saved_rows(lower)
        == [
            {
                "Experiment": "",
                "rev": "main",
                "typ": "baseline",
                "State": "",
                "metrics/test.json:micro_f1": "0.5",
                "train.seed": "1",
            }
        ]
    )


def test_saved_rows_of_any_other_suffix_are_json(tmp_path):
    # Only a .csv name means `dvc exp show --csv`: everything else is read as JSON.
    path = tmp_path / "runs.txt"
    path.write_text(json.dumps(ROWS))
    assert saved_rows(path) == ROWS


@pytest.mark.parametrize("document", ["{}", "5", "null"])
def test_saved_json_that_is_not_a_list_of_rows_is_refused(tmp_path, document):
    path = tmp_path / "rows.json"
    path.write_text(document)
    with pytest.raises(ValueError, match=r"rows.json: expected the rows of `dvc exp show --csv`"):
        saved_rows(path)


def test_an_empty_csv_param_cell_is_a_missing_param(tmp_path):
    # `dvc exp show --csv` leaves a param a run lacks empty: the run then has the value it ran
    # with (pipeline.config.ADDED_PARAMS), as from exp_show's None.
    params = [*PARAMS, "model.depth_embedding"]
    rows = [
        {**_row(None, 1, True, 0.8, rev="main", typ="baseline"), "model.depth_embedding": "tokens"},
        {**_row("old", 2, True, 0.7), "model.depth_embedding": None},
    ]
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    runs = finished_runs(saved_rows(path), params, ["micro_f1"])
    assert runs["params", "model.depth_embedding"].tolist() == ["tokens", "tokens"]
    (summary,) = seed_summary(runs, ["micro_f1"])
    assert summary["runs"] == ["main", "old"] and summary["seeds"] == [1, 2]


def test_the_last_experiment_of_a_commit_is_an_experiment_not_a_commit():
    # exp_show marks the last experiment under each commit "branch_base", the others
    # "branch_commit": both are experiments, so a commit with the same run counts, not them.
    rows = [
        _row("e1", 1234, True, 0.70, typ="branch_base"),
        _row(None, 1234, True, 0.80, rev="main", typ="baseline"),
    ]
    runs = finished_runs(rows, PARAMS, ["micro_f1"])
    assert runs["run", "baseline"].tolist() == [False, True]
    (summary,) = seed_summary(runs, ["micro_f1"])
    assert summary["runs"] == ["main"]
    assert summary["micro_f1"][:1] == (pytest.approx(0.80),)


def test_seeds_are_listed_by_value_numbers_before_the_rest():
    # A float seed key orders by value (1e-05 before 0.0005, not as text); a run without the
    # seed param (None) comes after every number.
    rows = [{**_row(None, 1, True, 0.8, rev="main", typ="baseline"), "train.lr": 0.001}]
    rows += [
        {**_row(f"lr{i}", 1, True, f1), "train.lr": lr}
        for i, (lr, f1) in enumerate([(1e-05, 0.6), (0.0005, 0.7)])
    ]
    (summary,) = seed_summary(finished_runs(rows, PARAMS, ["micro_f1"]), ["micro_f1"], "train.lr")
    assert summary["seeds"] == [1e-05, 0.0005, 0.001]
    rows = [
        _row(None, 2, True, 0.8, rev="main", typ="baseline"),
        {**_row("no-seed", 1, True, 0.6), "train.seed": None},
        _row("e", 1, True, 0.7),
    ]
    (summary,) = _summary(rows, ["micro_f1"])
    assert summary["seeds"] == [1, 2, None]


def test_compare_with_an_empty_params_file_finds_no_configuration(tmp_path):
    # No keys: no run has params, which is the "nothing found" error, not a traceback.
    (tmp_path / "params.yaml").write_text("")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    result = _compare(["--from-file", "rows.json"], tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == "error: no commits or finished experiments with params found\n"


def test_compare_reports_a_missing_saved_rows_file_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS_YAML)
    result = _compare(["--from-file", "nothere.json"], tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = result.output.splitlines()
    assert line.startswith("error: ") and "nothere.json" in line


def test_the_mean_is_the_mean_and_a_zero_score_counts():
    # Skewed scores tell a mean from a median; an F1 of 0.0 is a score, not a missing metric.
    f1s = [0.0, 0.6, 0.9]
    rows = [_row(None, 1, True, 0.8, rev="main", typ="baseline")]
    rows += [_row(f"d{seed}", seed, False, f1) for seed, f1 in zip([1, 2, 3], f1s, strict=True)]
    _, no_depth = _summary(rows, ["micro_f1"])
    mean, std, n = no_depth["micro_f1"]
    assert n == 3 and mean == pytest.approx(statistics.mean(f1s))
    assert std == pytest.approx(statistics.stdev(f1s))
    mean, std, n = no_depth["paired"]["micro_f1"]  # seed 1 only: 0.0 - 0.8
    assert (n, mean) == (1, pytest.approx(-0.8)) and math.isnan(std)
