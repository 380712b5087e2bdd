#!/usr/bin/env bash
# Fetch the wheels the GPU machine's image lacks (Python 3.12, manylinux x86_64, no network there)
# into .whl/ at the repo root, for `python -m bench.device`. Versions are those of requirements.lock.
#   dvclive + its import-time closure: accelerate's dvclive tracker; dvclive.live imports dvc at
#     module level and Live() opens a dvc Repo even with save_dvc_exp=False, dvcyaml=False.
#   pot: pipeline/model/ot.py, tests/test_model_ot.py.  grimp: tests/test_dvc_yaml.py (pytest
#     imports every test module; bench.device reports one that fails to import as an error).
# Left out on purpose: gdown (downloads only), dvc's unused requirements (celery, kombu, dvc-task,
# hydra-core, omegaconf, gto, pygit2, gitpython, asyncssh, ...), orjson and wcwidth (optional).
# On the GPU machine, from the repo root (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. \
#     POT_BACKEND_DISABLE_JAX=1 POT_BACKEND_DISABLE_CUPY=1
# (POT otherwise imports the image's jax and cupy; given torch tensors it instantiates its jax
#  backend first, which starts jax on the GPU and preallocates most of its memory.)
set -euo pipefail
cd "$(dirname "$0")/.."
[ ! -d .git ] || grep -qsx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  dvclive==3.49.1 dvc==3.67.1 dvc-data==3.18.3 dvc-objects==5.2.0 dvc-http==2.32.0 \
  dvc-render==1.0.2 dvc-studio-client==0.23.0 scmrepo==3.6.2 dulwich==1.2.21 funcy==2.1 \
  ruamel.yaml==0.19.1 atpublic==9.0.0 configobj==5.0.9 diskcache==5.6.3 dpath==2.2.0 \
  flatten-dict==0.5.0 flufl.lock==9.2.0 pygtrie==2.6.2 sqltrie==0.11.3 voluptuous==0.16.0 \
  zc.lockfile==4.0 platformdirs==4.14.9 pot==0.9.7.post1 grimp==3.20
ls .whl/*.whl | wc -l | xargs echo "wheels:"
du -ch .whl/*.whl | tail -1
