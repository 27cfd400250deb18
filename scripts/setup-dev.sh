#!/usr/bin/env bash
# A virtual environment with everything the test suite needs (CPU-only), in one command:
#   bash scripts/setup-dev.sh [VENV_DIR] [--oldest]     (default .venv), then . VENV_DIR/bin/activate
# --oldest installs the oldest torch and transformers that pyproject.toml declares (the floor CI
# tests) instead of the newest transformers release.
# TORCH_SPEC picks the torch build (default torch==2.13.0; elsewhere e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" for a CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
oldest=0
for arg in "$@"; do
  case "$arg" in
    --oldest) oldest=1 ;;
    *) venv="$arg" ;;
  esac
done
# The declared floors (pyproject.toml; tests/test_compat.py checks they agree)
TORCH_FLOOR=2.13.0
TRANSFORMERS_FLOOR=5.20.0
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build
if [ "$oldest" = 1 ]; then
  python -m pip install -q "torch==$TORCH_FLOOR" "transformers==$TRANSFORMERS_FLOOR"
else
  # shellcheck disable=SC2086
  python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
python -m pip install -q -e ".[test]"
if [ "$oldest" = 0 ]; then
  # lmms-eval for tests/test_lmms_eval.py, CPU-only: what its evaluator imports, then lmms-eval itself
  # without its own dependency list (which pulls a CUDA torch and video / API clients). In this order
  # pip has nothing to complain about. filelock<4.3: lmms-eval 0.7.3 imports filelock._api.
  python -m pip install -q datasets evaluate sacrebleu loguru pytz tenacity pyyaml jinja2 pandas pytablewriter \
      "filelock<4.3"
  python -m pip install -q --no-deps "lmms-eval==0.7.3"
fi
python -c "import torch, transformers; print('ready: torch', torch.__version__, 'transformers', transformers.__version__)"
