#!/usr/bin/env bash
# Second device pass: backend-parity tests on CuPy and the per-layer GPU profile.
set -uo pipefail
OUT=${1:?usage: device_profile.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hicd-site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/hicd-site:$PWD
status=0
timeout 120 python3 -m pytest -q -p no:cacheprovider -k cupy tests/ > "$OUT/pytest_cupy.txt" 2>&1 || status=1
tail -n 5 "$OUT/pytest_cupy.txt"
timeout 150 python3 examples/profile_layers.py --backend cupy --batch 16 --size 256 --torch > "$OUT/profile_cupy.jsonl" 2>&1 || status=1
cat "$OUT/profile_cupy.jsonl"
exit $status
