#!/usr/bin/env bash
# The GPU device check (benchmarks/gpu_check.py) from the repository root, without installing the package:
#   bash benchmarks/gpu_check.sh [OUT] [gpu_check.py options...]      e.g.  bash benchmarks/gpu_check.sh "$OUT" --minutes 3
# Writes OUT/gpu_check.json, OUT/gpu_check.log and OUT/console.log (everything printed). PYTHON overrides python3.
set -uo pipefail
OUT=${1:-runs/gpu-check}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"${PYTHON:-python3}" benchmarks/gpu_check.py --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/console.log"
