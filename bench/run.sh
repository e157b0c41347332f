#!/usr/bin/env bash
# Benchmark entry point: build the peers' venv once, then run the harness.
# Usage: bash bench/run.sh [run_bench.py options, e.g. --quick, --scenarios cl_10k,cl_100k]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.bench-venv"
MARKER="$VENV/.bench-installed-v1"

if [[ ! -f "$MARKER" ]]; then
    echo "bench: creating $VENV (one-off: several minutes, biogeme's extension may compile)" >&2
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    # CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
    "${PIP[@]}" "torch==2.13.0"
    # torch-choice requires torchvision; an unpinned one pulls a newer torch (and CUDA), so pin
    # the torchvision built for torch 2.13 and hold torch with a constraint. torch-choice also
    # pins numpy<2, and pyarrow 21+ needs numpy 2.
    CONSTRAINTS="$VENV/bench-constraints.txt"
    printf 'torch==2.13.0\ntorchvision==0.28.0\npyarrow<21\n' > "$CONSTRAINTS"
    "${PIP[@]}" -c "$CONSTRAINTS" "torch-choice==1.0.7" "xlogit==0.2.7" "biogeme==3.2.13" \
        polars pyarrow numpy
    "${PIP[@]}" "torch==2.13.0"  # re-pin, in case anything moved it
    # PyPI's torchvision is built against CUDA torch; torch-choice never imports it, and
    # torchmetrics (via Lightning) skips it when absent, so drop it if it cannot load.
    "$VENV/bin/python" -c "import torchvision" 2>/dev/null \
        || "$VENV/bin/python" -m pip uninstall --quiet -y torchvision
    "$VENV/bin/python" -c "import torch, torch_choice, xlogit, biogeme, polars, pyarrow, numpy"
    touch "$MARKER"
fi

exec "$VENV/bin/python" "$ROOT/bench/run_bench.py" "$@"
