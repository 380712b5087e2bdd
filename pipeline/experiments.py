"""Compare DVC experiments across seeds: the mean and spread of test metrics per configuration.

A single-seed ablation on a small test set is mostly noise. Run each configuration with several
``train.seed`` values (``dvc exp run --queue -S train.seed=N ...``), then :func:`seed_summary` groups
the experiments of ``dvc exp show --json`` by every param except the seed, names each group by how
its params differ from the baseline commit, and gives mean, standard deviation and count per metric.

Seeds are the unit of comparison: a configuration run with the baseline's seeds is also compared
pair by pair (same seed, so the same data order and initial draw where the change allows it), and
the mean ± std of those paired differences is the error bar of "this change costs X".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["Run", "runs_from_exp_show", "seed_summary", "summary_markdown"]

PARAMS_FILE = "params.yaml"
METRICS_FILE = "metrics/test.json"


@dataclass(frozen=True)
class Run:
    """One commit or experiment: flat ``dotted.key -> value`` params and metrics."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, float]
    baseline: bool = False


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _run(name: str, data: dict | None, baseline: bool) -> Run | None:
    if not data:
        return None
    params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data")
    metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
    if not params:
        return None
    numeric = {
        k: float(v)
        for k, v in _flatten(metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return Run(name, _flatten(params), numeric, baseline)


def runs_from_exp_show(rows: list[dict]) -> list[Run]:
    """The baseline commits and their finished experiments from ``dvc exp show --json``. Left out:
    the workspace row (it repeats a commit or an applied experiment) and queued, running or failed
    experiments (a running one reports the workspace's metrics, not its own)."""
    runs = []
    for row in rows:
        if row.get("rev") == "workspace":
            continue
        run = _run(row.get("name") or str(row.get("rev", ""))[:7], row.get("data"), True)
        if run is not None:
            runs.append(run)
        for experiment in row.get("experiments") or []:
            executor = experiment.get("executor") or {}
            if executor.get("state", "success") != "success":
                continue
            for rev in experiment.get("revs") or []:
                if (rev.get("data") or {}).get("rev") == "workspace":
                    continue
                name = rev.get("name") or experiment.get("name") or str(rev.get("rev", ""))[:7]
                run = _run(name, rev.get("data"), False)
                if run is not None:
                    runs.append(run)
    return runs


def _label(params: dict[str, Any], baseline: dict[str, Any], seed_key: str) -> str:
    changed = [
        f"{key}={params.get(key)}"
        for key in sorted(set(params) | set(baseline))
        if key != seed_key and params.get(key) != baseline.get(key)
    ]
    return ", ".join(changed) or "baseline"


def _seed_order(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int | float) else (1, str(seed))


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    mean = statistics.fmean(values) if values else math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std, len(values)


def seed_summary(
    runs: list[Run], metrics: list[str], seed_key: str = "train.seed"
) -> list[dict[str, Any]]:
    """One row per configuration (params other than ``seed_key``): its label, seeds, experiment
    names and, per metric, ``(mean, std, n)`` over the runs that report it (std is NaN for one).
    ``row["paired"][metric]`` is ``(mean, std, n)`` of the differences to the baseline row over the
    seeds both have (n = 0 for the baseline itself or without common seeds). Rows keep the order
    in which configurations first appear, baseline first."""
    if not runs:
        return []
    baseline = next((r for r in runs if r.baseline), runs[0]).params
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: not r.baseline):
        groups.setdefault(_label(run.params, baseline, seed_key), []).append(run)
    by_seed: dict[str, dict[Any, Run]] = {}
    for label, members in groups.items():
        # A commit and an experiment with the same params and seed are the same run: count it once.
        unique = by_seed[label] = {}
        for run in members:
            unique.setdefault(run.params.get(seed_key), run)
    base_runs = next(iter(by_seed.values()))
    rows = []
    for index, (label, unique) in enumerate(by_seed.items()):
        row: dict[str, Any] = {
            "configuration": label,
            "seeds": sorted(unique, key=_seed_order),
            "runs": [r.name for r in unique.values()],
            "paired": {},
        }
        for metric in metrics:
            row[metric] = _mean_std(
                [r.metrics[metric] for r in unique.values() if metric in r.metrics]
            )
            differences = [
                run.metrics[metric] - base_runs[seed].metrics[metric]
                for seed, run in unique.items()
                if index > 0
                and seed in base_runs
                and metric in run.metrics
                and metric in base_runs[seed].metrics
            ]
            row["paired"][metric] = _mean_std(differences)
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
