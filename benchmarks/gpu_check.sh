#!/usr/bin/env bash
# The GPU path in one command (benchmarks/gpu_check.py): compiled == eager for every
# pipeline in float32 and float64, then adam, diffgrad, scalpel and muon against torch
# fused Adam and torch.optim.Muon at 10M and 100M parameters, with % of HBM bandwidth.
#
#   benchmarks/gpu_check.sh [OUT.json] [--device cuda|cpu] [--quick] [--jobs N] ...
#
# Writes OUT.json (default benchmarks/results/gpu-<date>.json), prints a summary, exits 1
# if any compiled result differs from eager, 2 without the device. Python: $PYTHON, else
# the repository's .venv, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
