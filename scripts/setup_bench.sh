#!/usr/bin/env bash
# Creates .venv-bench at the repository root: dcheckpoint plus the benchmark's peers
# (orbax-checkpoint, PyTorch's CPU wheel for torch.distributed.checkpoint) and a
# profiler. Kept apart from .venv so the test suite never sees the peers.
#
# Usage: bash scripts/setup_bench.sh        (then: .venv-bench/bin/python scripts/bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv-bench/bin/python ] || "$PY" -m venv .venv-bench
PIP=".venv-bench/bin/pip"
"$PIP" install --upgrade pip >/dev/null
# Same JAX stack as the test venv, so the comparison measures the checkpoint systems.
cat > .venv-bench/pins.txt <<'PINS'
jax==0.10.2
jaxlib==0.10.2
tensorstore==0.1.86
PINS
# torch==2.13.0 resolves to the local CPU wheel; an unpinned torch pulls CUDA (gigabytes).
"$PIP" install -c .venv-bench/pins.txt -e . mpi4py mpich orbax-checkpoint \
    "torch==2.13.0" py-spy psutil
echo "ok: .venv-bench ready"
