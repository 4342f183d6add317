#!/usr/bin/env bash
# One entry point for a fresh machine with only Python 3.11:
#   bash scripts/run.sh demo     merge the bundled adapters, save, reload with PEFT, print the table
#   bash scripts/run.sh test     lint (ruff), type-check (mypy), then run the test suite; CI runs exactly this
#   bash scripts/run.sh test ARGS...   only pytest, with these arguments (e.g. -m "not slow" -x)
# Creates ./.venv on first use and installs what is needed (idempotent: reinstalls only when
# pyproject.toml changes). torch is installed FIRST, pinned to the CPU wheel, so that pip does not
# pull a multi-GB CUDA build when resolving the project's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${OFTMERGE_TORCH_SPEC:-torch==2.13.0}"
VENV="${OFTMERGE_VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtualenv $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.oftmerge-installed"
want="$(cat pyproject.toml scripts/run.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing $TORCH_SPEC and oftmerge[test] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    echo "$want" > "$stamp"
fi

cmd="${1:-}"
shift || true
export PYTHONHASHSEED=0
case "$cmd" in
    demo) exec "$VENV/bin/oftmerge" demo "$@" ;;
    test)
        # With no arguments (the full run, as in CI): ruff and mypy first, each failing the run on a
        # finding. With arguments: only pytest, with those arguments (quick subsets, single files).
        if [ "$#" -eq 0 ]; then
            "$VENV/bin/ruff" check oftmerge scripts tests
            "$VENV/bin/mypy" oftmerge
        fi
        exec "$VENV/bin/python" -m pytest "$@" ;;
    *) echo "usage: bash scripts/run.sh demo|test [args...]" >&2; exit 2 ;;
esac
