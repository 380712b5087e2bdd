"""The `depth` stage (work in progress)."""

from __future__ import annotations


def main() -> None:
    """Not implemented yet."""
    raise NotImplementedError("depth")
