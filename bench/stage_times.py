"""Wall time and peak memory of each pipeline stage on the embedded default.

Copies the working tree to a temporary git repo, then runs `dvc repro --single-item <stage>` for each
stage in order, each through a small wrapper that reports the peak RSS of its child processes.
Prints a Markdown table (the README quotes it, with the machine it came from).

    python -m bench.stage_times [-S key=value ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("download", "depth", "caption", "features", "train", "evaluate")

# Run in a child: time one command and report the peak RSS of the largest process it waited for.
_WRAPPER = (
    "import resource, subprocess, sys, time;"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode;"
    "dt = time.perf_counter() - t;"
    "print(f'@@ {dt:.3f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr);"
    "sys.exit(rc)"
)


def set_key(params: dict, dotted: str, text: str) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = yaml.safe_load(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="key=value")
    args = parser.parse_args()

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for name in files:
            if (ROOT / name).is_file():
                (repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, repo / name)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        for item in args.overrides:
            key, _, value = item.partition("=")
            set_key(params, key, value)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (repo / "dvc.lock").unlink(missing_ok=True)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
            subprocess.run(cmd, cwd=repo, check=True, env=env)
        subprocess.run(
            ["git", "-c", "user.name=bench", "-c", "user.email=bench@local", "commit", "-qm", "bench"],
            cwd=repo, check=True, env=env,
        )  # fmt: skip
        rows = []
        total = 0.0
        for stage in STAGES:
            cmd = [
                sys.executable,
                "-c",
                _WRAPPER,
                str(BIN / "dvc"),
                "repro",
                "--single-item",
                stage,
            ]
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"stage {stage} failed:\n{proc.stdout}\n{proc.stderr}")
            marker = [line for line in proc.stderr.splitlines() if line.startswith("@@ ")][-1]
            seconds, maxrss_kb = float(marker.split()[1]), int(marker.split()[2])
            total += seconds
            rows.append((stage, seconds, maxrss_kb / 1024))
            print(f"{stage}: {seconds:.1f} s, peak RSS {maxrss_kb / 1024:.0f} MiB", file=sys.stderr)
    cpu = platform.processor() or platform.machine()
    print(f"Machine: {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, "
          f"torch threads default; overrides: {' '.join(args.overrides) or 'none'}")  # fmt: skip
    print()
    print("| stage | wall time (s) | peak RSS (MiB) |")
    print("| --- | ---: | ---: |")
    for stage, seconds, mib in rows:
        print(f"| {stage} | {seconds:.1f} | {mib:.0f} |")
    print(f"| **total** | **{total:.1f}** | |")


if __name__ == "__main__":
    main()
