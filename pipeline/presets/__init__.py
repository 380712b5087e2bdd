"""Named parameter presets: flat mappings of dotted params keys to values (``paper.yaml``, ...)."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params, ParamsError, apply_overrides
from pipeline.io import atomic_write_text

PRESETS_DIR = Path(__file__).resolve().parent

__all__ = ["available_presets", "load_preset", "apply_preset", "as_exp_flags", "write_into_params"]


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's overrides, with ``extends:`` resolved (the child wins)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown preset {name!r} (available: {', '.join(available_presets())})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of dotted keys to values")
    parent = raw.pop("extends", None)
    merged = load_preset(parent) if parent else {}
    merged.update(raw)
    return merged


def apply_preset(params: Params, name: str) -> Params:
    """``params`` with the preset applied and validated against the schema."""
    try:
        return apply_overrides(params, load_preset(name))
    except ParamsError as exc:
        raise ParamsError(f"preset {name!r}: {exc}") from exc


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, list):  # Hydra's list syntax, without spaces: [dvclive,tensorboard]
        return "[" + ",".join(_yaml_scalar(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def as_exp_flags(overrides: dict[str, Any]) -> list[str]:
    """``dvc exp run`` flags: ``["-S", "data.source=umre", ...]`` (Hydra override syntax).

    Values carry no shell quoting, so ``dvc exp run $(python -m stages preset paper)`` works."""
    flags: list[str] = []
    for key, value in overrides.items():
        text = "''" if value == "" else _yaml_scalar(value)
        if any(c.isspace() for c in text):
            raise ParamsError(f"preset value for {key} has white space; not expressible as a flag")
        flags += ["-S", f"{key}={text}"]
    return flags


def write_into_params(path: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in a params.yaml in place, keeping its comments and order."""
    from ruamel.yaml import YAML  # a DVC dependency; round-trips comments

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    doc = yaml_rt.load(path.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise ParamsError(f"{path}: {dotted}: unknown key")
        node[leaf] = value
    buf = StringIO()
    yaml_rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
