"""Seed summaries of `dvc exp show --json` output: grouping, labels, statistics, skipped rows."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from pipeline.experiments import runs_from_exp_show, seed_summary, summary_markdown


def _data(seed: int, depth: bool, f1: float | None, rev: str = "abc") -> dict:
    metrics = (
        {}
        if f1 is None
        else {
            "metrics/test.json": {
                "data": {"micro_f1": f1, "by_pair_kind": {"text-text": {"micro_f1": f1 / 2}}}
            }
        }
    )
    params = {
        "params.yaml": {
            "data": {"train": {"seed": seed, "lr": 0.002}, "data": {"use_depth": depth}}
        }
    }
    return {"rev": rev, "params": params, "metrics": metrics}


def _experiment(name: str, data: dict, state: str | None = "success") -> dict:
    executor = None if state is None else {"state": state}
    return {
        "name": name,
        "executor": executor,
        "revs": [{"rev": "x" * 40, "name": name, "data": data}],
    }


ROWS = [
    {"rev": "workspace", "name": None, "data": _data(1234, True, 0.5, rev="workspace")},
    {
        "rev": "f" * 40,
        "name": "main",
        "data": _data(1234, True, 0.80),
        "experiments": [
            _experiment("base-seed1", _data(1, True, 0.90)),
            _experiment("no-depth", _data(1234, False, 0.70), state=None),
            _experiment("no-depth-seed1", _data(1, False, 0.60)),
            _experiment("no-depth-seed2", _data(2, False, 0.65)),
            _experiment("running", _data(3, False, 0.99, rev="workspace"), state="running"),
            _experiment("failed", _data(4, False, None), state="failed"),
        ],
    },
]


def test_groups_by_params_other_than_the_seed_and_labels_by_difference():
    runs = runs_from_exp_show(json.loads(json.dumps(ROWS)))
    assert [r.name for r in runs] == [
        "main",
        "base-seed1",
        "no-depth",
        "no-depth-seed1",
        "no-depth-seed2",
    ]
    keys = ["micro_f1", "by_pair_kind.text-text.micro_f1", "missing"]
    rows = seed_summary(runs, keys)
    assert [r["configuration"] for r in rows] == ["baseline", "data.use_depth=False"]
    base, no_depth = rows
    assert base["seeds"] == [1, 1234] and no_depth["seeds"] == [1, 2, 1234]
    mean, std, n = no_depth["micro_f1"]
    assert n == 3 and mean == pytest.approx(0.65)
    assert std == pytest.approx(statistics.stdev([0.70, 0.60, 0.65]))
    assert base["by_pair_kind.text-text.micro_f1"][0] == pytest.approx(0.425)
    assert base["missing"][2] == 0 and math.isnan(base["missing"][0])


def test_a_commit_repeated_by_an_experiment_counts_once():
    rows = ROWS[:1] + [dict(ROWS[1], experiments=[_experiment("same", _data(1234, True, 0.80))])]
    (summary,) = seed_summary(runs_from_exp_show(rows), ["micro_f1"])
    assert summary["micro_f1"][2] == 1 and summary["runs"] == ["main"]


def test_markdown_shows_mean_and_spread():
    rows = seed_summary(runs_from_exp_show(ROWS), ["micro_f1", "missing"])
    table = summary_markdown(rows, ["micro_f1", "missing"]).splitlines()
    assert table[0] == (
        "| configuration | seeds | micro_f1 | missing | Δ micro_f1 vs baseline, paired by seed |"
    )
    assert table[2] == "| `baseline` | 1, 1234 | 0.850 ± 0.071 | – | – |"
    assert table[3] == (
        "| `data.use_depth=False` | 1, 2, 1234 | 0.650 ± 0.050 | – | -0.200 ± 0.141 (n=2) |"
    )


def test_paired_difference_uses_only_seeds_both_configurations_ran():
    base, no_depth = seed_summary(runs_from_exp_show(ROWS), ["micro_f1"])
    assert base["paired"]["micro_f1"][2] == 0
    mean, std, n = no_depth["paired"]["micro_f1"]
    # Seed 2 has no baseline partner; seeds 1 and 1234 give 0.60 - 0.90 and 0.70 - 0.80.
    assert n == 2
    assert mean == pytest.approx(-0.20)
    assert std == pytest.approx(statistics.stdev([-0.30, -0.10]))
    # The paired spread removes what the seeds share: here a per-seed offset.
    shifted = [
        {
            "rev": "f" * 40,
            "data": _data(1, True, 0.90),
            "experiments": [
                _experiment(f"s{seed}", _data(seed, True, f1))
                for seed, f1 in [(2, 0.70), (3, 0.80)]
            ]
            + [
                _experiment(f"d{seed}", _data(seed, False, f1 - 0.05))
                for seed, f1 in [(1, 0.90), (2, 0.70), (3, 0.80)]
            ],
        }
    ]
    base, no_depth = seed_summary(runs_from_exp_show(shifted), ["micro_f1"])
    assert base["micro_f1"][1] == pytest.approx(0.1)
    mean, std, n = no_depth["paired"]["micro_f1"]
    assert (n, mean) == (3, pytest.approx(-0.05)) and std == pytest.approx(0.0, abs=1e-12)


def test_nothing_to_summarize():
    assert seed_summary([], ["micro_f1"]) == []
    assert runs_from_exp_show([{"rev": "workspace", "data": _data(1, True, 0.1)}]) == []
