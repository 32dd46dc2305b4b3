#!/usr/bin/env bash
# Creates .bench-mlserver-venv (repo root, git-ignored) holding the baseline of the serving
# benchmark: Seldon's MLServer 1.7.1 serving torch's stock LRN (models/runtime.py beside this file).
# It is a venv of its own because MLServer pins things (fastapi<0.116, its own grpcio/protobuf
# ranges, tritonclient, opentelemetry, ...) that must not leak into the project's .venv.
#
#     bash bench/mlserver_baseline/setup.sh        # idempotent: a second run only checks
#
# torch is installed FIRST and only as the CPU build: the spec "torch==2.13.0+cpu" can only be
# met by a CPU wheel (PyPI's plain torch==2.13.0 is the multi-GB CUDA build and does not match a
# "+cpu" local version), found in pip's find-links (/opt/wheels here) or on PyTorch's CPU index.
# MLServer is then installed with that torch pinned as a constraint, so nothing can swap it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${BENCH_MLSERVER_VENV:-$ROOT/.bench-mlserver-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
MLSERVER_SPEC="mlserver==1.7.1"
CPU_TORCH_INDEX="${CPU_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
MARKER="$VENV/.installed-mlserver-1.7.1-torch-2.13.0-uvloop-0.21.0"

VERSIONS='from importlib.metadata import version as v; print("mlserver", v("mlserver"), "torch", v("torch"), "uvloop", v("uvloop"))'
if [ -f "$MARKER" ] && [ -x "$VENV/bin/mlserver" ] && versions="$("$VENV/bin/python" -c "$VERSIONS" 2>/dev/null)"; then
    echo "baseline venv ready: $VENV ($versions)"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet)
"${PIP[@]}" install --upgrade pip

if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__ == '2.13.0+cpu' else 1)" 2>/dev/null; then
    echo "torch 2.13.0+cpu already installed"
elif "${PIP[@]}" install "$TORCH_SPEC" 2>/dev/null; then
    echo "installed $TORCH_SPEC from pip's configured sources"
else
    echo "installing $TORCH_SPEC from $CPU_TORCH_INDEX"
    "${PIP[@]}" install "$TORCH_SPEC" --extra-index-url "$CPU_TORCH_INDEX"
fi

CONSTRAINTS="$VENV/bench-constraints.txt"
# torch: keep the CPU build just installed.
# uvloop==0.21.0: MLServer 1.7.1 (June 2025) leaves uvloop unpinned; with the newest, 0.23.0, its
# policy's get_event_loop() raises "There is no current event loop in thread 'MainThread'", which
# MLServer's inference worker calls at start (mlserver/parallel/worker.py, _ignore_signals): the
# worker dies at once and MLServer restarts it forever. 0.21.0 (Oct 2024, before 1.7.1) works.
# Everything else resolves as pip picks it (pip check is clean); pandas comes out as 3.x, newer
# than MLServer 1.7.1 was tested with, but only MLServer's pandas codec uses it, which this runtime
# does not.
printf '%s\n' "$TORCH_SPEC" "uvloop==0.21.0" > "$CONSTRAINTS"
"${PIP[@]}" install "$MLSERVER_SPEC" -c "$CONSTRAINTS"
"$VENV/bin/python" -m pip check || echo "warning: pip check reports conflicts (see above)" >&2
"$VENV/bin/python" -c "import torch, mlserver" && "$VENV/bin/python" -c "$VERSIONS"
touch "$MARKER"
