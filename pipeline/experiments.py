"""Compare DVC experiments across seeds: the mean and spread of test metrics per configuration.

A single-seed ablation on a small test set is mostly noise. Run each configuration with several
``train.seed`` values (``dvc exp run --queue -S train.seed=N ...``), then :func:`seed_summary` groups
the finished rows of ``dvc.api.exp_show()`` by every param except the seed, names each group by how
its params differ from the baseline commit, and gives mean, standard deviation and count per metric.

Seeds are the unit of comparison: a configuration run with the baseline's seeds is also compared
pair by pair (same seed, so the same data order and initial draw where the change allows it), and
the mean ± std of those paired differences is the error bar of "this change costs X".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import ADDED_PARAMS
from pipeline.io import read_json

__all__ = [
    "finished_runs",
    "left_out_states",
    "param_values",
    "saved_rows",
    "seed_summary",
    "summary_markdown",
]

PARAMS_FILE = "params.yaml"
METRICS_FILE = "metrics/test.json"


def param_values(params: dict[str, Any]) -> dict[str, Any]:
    """The dotted leaves of a params tree with their values (``{"train": {"seed": 1}}`` ->
    ``{"train.seed": 1}``)."""
    frame = pd.json_normalize(params)
    return {key: frame[key].tolist()[0] for key in frame.columns}  # no row-wise upcast


def saved_rows(path: Path) -> list[dict[str, Any]]:
    """Rows saved by ``dvc exp show --csv > PATH.csv`` or as a JSON list of ``dvc.api.exp_show()``
    rows, for :func:`finished_runs`."""
    if path.suffix.lower() == ".csv":
        rows = pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    else:
        rows = read_json(path, "saved rows file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "typ" in r for r in rows):
        raise ValueError(
            f"{path}: expected the rows of `dvc exp show --csv` or a JSON list of "
            "dvc.api.exp_show() rows (each with a 'typ' column)"
        )
    return rows


def _column(columns: set[str], file: str, key: str) -> str:
    # exp_show names a column `file:key` only where two files share the key.
    prefixed = f"{file}:{key}"
    return prefixed if prefixed in columns else key


def _param(value: Any, like: Any = None) -> Any:
    # exp_show gives numbers as floats and the rest as text; a saved CSV gives everything as text.
    # A number takes the type of ``like``, the key's value in params.yaml (1.0 stays 1.0 where
    # params.yaml has a float; a whole number is an int otherwise).
    if value is None or value in ("", "None"):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and isinstance(like, float):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _metric(value: Any) -> float:
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _unfinished(row: dict[str, Any]) -> bool:
    """Queued, running or failed: exp_show gives finished experiments "Success", commits no
    state."""
    return row.get("State") not in (None, "", "Success")


def left_out_states(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many experiments :func:`finished_runs` leaves out for their state, by state
    (``{"Queued": 2, "Running": 1}``), in the order the states first appear."""
    counts: dict[str, int] = {}
    for row in rows:
        if _unfinished(row):
            counts[row["State"]] = counts.get(row["State"], 0) + 1
    return counts


def finished_runs(
    rows: list[dict[str, Any]], params: list[str] | dict[str, Any], metrics: list[str]
) -> pd.DataFrame:
    """The commits and finished experiments among ``dvc.api.exp_show()`` rows, one row each, with
    columns ``("run", "name" | "baseline")``, ``("params", key)`` and ``("metrics", key)`` (NaN
    where a run does not report a metric). Left out: the workspace row (it repeats a commit or an
    applied experiment), queued, running or failed experiments (a running one reports the
    workspace's metrics, not its own) and rows without params. A param a run lacks because it was
    added later (:data:`pipeline.config.ADDED_PARAMS`) takes the value the run had in effect.
    ``params``: the keys, or :func:`param_values` of params.yaml, whose types the numbers then
    take."""
    like = params if isinstance(params, dict) else {}
    columns = set().union(*rows) if rows else set()
    runs, run_params, run_metrics = [], [], []
    for row in rows:
        baseline = row.get("typ") == "baseline"
        if baseline and row.get("rev") == "workspace":
            continue
        if _unfinished(row):
            continue
        values = {
            key: _param(row.get(_column(columns, PARAMS_FILE, key)), like.get(key))
            for key in params
        }
        if all(value is None for value in values.values()):
            continue
        # A run from before a param existed ran with the value that reproduces the old code.
        values.update(
            {k: ADDED_PARAMS[k] for k, v in values.items() if v is None and k in ADDED_PARAMS}
        )
        runs.append({"name": row.get("Experiment") or row.get("rev"), "baseline": baseline})
        run_params.append(values)
        run_metrics.append(
            {m: _metric(row.get(_column(columns, METRICS_FILE, m))) for m in metrics}
        )
    return pd.concat(
        {
            "run": pd.DataFrame(runs, columns=["name", "baseline"]),
            "params": pd.DataFrame(run_params, columns=params, dtype=object),
            "metrics": pd.DataFrame(run_metrics, columns=metrics, dtype=float),
        },
        axis=1,
    )


def _label(params: pd.Series, baseline: pd.Series, seed_key: str) -> str:
    changed = [
        f"{key}={params[key]}"
        for key in sorted(params.index)
        if key != seed_key and params[key] != baseline[key]
    ]
    return ", ".join(changed) or "baseline"


def _seed_order(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int | float) else (1, str(seed))


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    return float(values.mean()), float(values.std()), int(values.count())


def seed_summary(
    runs: pd.DataFrame, metrics: list[str], seed_key: str = "train.seed"
) -> list[dict[str, Any]]:
    """One row per configuration (params other than ``seed_key``) of :func:`finished_runs`: its
    label, seeds, run names and, per metric, ``(mean, std, n)`` over the runs that report it (std is
    NaN for one). ``row["paired"][metric]`` is ``(mean, std, n)`` of the differences to the
    baseline row over the seeds both have (n = 0 for the baseline itself or without common seeds).
    Rows keep the order in which configurations first appear, baseline first."""
    if runs.empty:
        return []
    if seed_key not in runs["params"]:
        raise ValueError(f"the seed key {seed_key!r} is not a param of {PARAMS_FILE}")
    # Commits first, so that a commit and an experiment with the same params and seed (the same
    # run) count once, as the commit.
    runs = runs.sort_values(("run", "baseline"), ascending=False, kind="stable")
    runs = runs[~runs["params"].duplicated()]
    baseline = runs["params"].iloc[0]
    # A label names every param but the seed that differs from the baseline: grouping by labels
    # is grouping by those params.
    labels = runs["params"].apply(_label, axis=1, args=(baseline, seed_key))
    base_metrics = None
    rows = []
    for label, group in runs.groupby(labels, sort=False):
        seeds = group["params", seed_key].tolist()
        values = group["metrics"].set_axis(seeds)
        if base_metrics is None:
            base_metrics = values
            differences = values * math.nan
        else:
            differences = values - base_metrics.reindex(seeds)
        row: dict[str, Any] = {
            "configuration": label,
            "seeds": sorted(seeds, key=_seed_order),
            "runs": group["run", "name"].tolist(),
            "paired": {metric: _mean_std(differences[metric]) for metric in metrics},
        }
        row.update({metric: _mean_std(values[metric]) for metric in metrics})
        rows.append(row)
    return rows


def _cell(mean: float, std: float, n: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if n == 0:
        return "–"
    if n == 1:
        return f"{mean:{sign}.3f}"
    return f"{mean:{sign}.3f} ± {std:.3f}"


def summary_markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """A Markdown table: configuration, seeds, ``mean ± std`` per metric, then the paired
    difference to the baseline in the first metric (``mean ± std (n seeds)``)."""
    paired = f"Δ {metrics[0]} vs baseline, paired by seed"
    header = ["configuration", "seeds", *metrics, paired]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['configuration']}`", ", ".join(map(str, row["seeds"]))]
        cells += [_cell(*row[metric]) for metric in metrics]
        mean, std, n = row["paired"][metrics[0]]
        cells.append(_cell(mean, std, n, signed=True) + (f" (n={n})" if n else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
