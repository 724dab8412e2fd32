#!/usr/bin/env bash
# Compare the im2col layouts of conv2d on a GPU (see hicd_core.functional.CONV_LAYOUTS and bench.py --conv-layout).
set -uo pipefail
OUT=${1:?usage: device_layouts.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hicd-site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/hicd-site:$PWD
status=0
timeout 90 python3 -m pytest -q -p no:cacheprovider -k cupy tests/test_functional.py tests/test_model.py \
  tests/test_backend_parity.py > "$OUT/pytest_cupy.txt" 2>&1 || status=1
tail -n 3 "$OUT/pytest_cupy.txt"
for mode in task hicd; do
  for layout in batched merged flat; do
    timeout 60 python3 benchmarks/bench.py --backend cupy --mode $mode --batch 16 --size 256 --steps 20 \
      --conv-layout $layout --json 2>&1 | tail -n 1 | tee -a "$OUT/bench_layouts.jsonl" || status=1
  done
done
timeout 60 python3 benchmarks/profile_layers.py --backend cupy --batch 16 --size 256 > "$OUT/profile_cupy.jsonl" 2>&1 || status=1
tail -n 1 "$OUT/profile_cupy.jsonl"
exit $status
