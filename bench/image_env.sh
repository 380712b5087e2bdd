#!/usr/bin/env bash
# The test suite under the GPU image's library versions (bench/image-versions.txt), on this CPU,
# before a lent GPU spends its minutes on an import error: the device check runs on that image's
# python3 and packages, not on requirements.lock. The rest comes from requirements.lock.
#   bash bench/image_env.sh                 # the whole suite (about 12 minutes on 2 cores)
#   bash bench/image_env.sh -m gpu          # any pytest arguments
# Needs PyPI (torch's CUDA build and its nvidia libraries: about 6 GB in $IMAGE_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${IMAGE_VENV:-/tmp/remote-image-venv}
pins=bench/image-versions.txt
if [ ! -f "$venv/.installed" ] || [ "$pins" -nt "$venv/.installed" ]; then
  python3 -m venv "$venv"
  names=$(grep -vE '^\s*(#|$)' "$pins" | cut -d= -f1 | paste -sd'|')
  # The lock without the image's packages, CUDA's (torch brings its own) and setuptools (torch
  # caps it).
  grep -E '^[A-Za-z0-9._-]+==' requirements.lock | sed 's/ *;.*//; s/ *\\$//' \
    | grep -viE "^(${names}|setuptools|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==" > "$venv/rest.txt"
  "$venv/bin/python" -m pip install -q -r "$pins" -r "$venv/rest.txt"
  touch "$venv/.installed"
fi
"$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
PATH="$venv/bin:$PATH" PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
