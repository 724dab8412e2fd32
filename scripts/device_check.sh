#!/usr/bin/env bash
# GPU check for a machine with CuPy and PyTorch preinstalled and no network.
#
#   bash scripts/device_check.sh OUTDIR
#
# Installs the project from this tree (plus the wheels in .whl/ for the pure-Python
# packages such a machine lacks: array-api-compat, array-api-strict), runs the
# CuPy-parametrised tests, then the training-step benchmark (task and hicd modes,
# batch 16, size 256) against a PyTorch CUDA twin and the hicd_loss benchmark
# against torch autograd on CUDA, and the per-layer profile (benchmarks/profile_layers.py);
# the step benchmark runs once with the default conv layout and once with "flat". Every figure
# lands as JSON in OUTDIR, the script's own run time in OUTDIR/wall.txt.
set -uo pipefail
OUT=${1:?usage: device_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hicd-site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/hicd-site${PYTHONPATH:+:$PYTHONPATH}
fi
# pip needs setuptools to install the tree; where that is missing offline, the tree goes on PYTHONPATH
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/hicd-install.txt 2>&1 \
  || { echo "editable install failed offline; using the tree on PYTHONPATH"; export PYTHONPATH=$PWD:$PYTHONPATH; }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, numpy, cupy, torch; print(sys.version); print('numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
timeout 240 python3 -m pytest -q -p no:cacheprovider -k cupy tests/ > "$OUT/pytest_cupy.txt" 2>&1 || status=1
tail -n 15 "$OUT/pytest_cupy.txt"
# the PyTorch adapter on CUDA tensors (tests/test_torch.py, marked gpu)
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_torch.py > "$OUT/pytest_torch_cuda.txt" 2>&1 || status=1
tail -n 5 "$OUT/pytest_torch_cuda.txt"

# data-parallel collectives over NCCL on CuPy (tests/test_parallel.py; needs mpi4py and an mpiexec,
# e.g. the mpich and mpi4py wheels in .whl/; one rank per GPU, so one rank on a one-GPU machine)
if python3 -c "import mpi4py" 2> /dev/null; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -k "nccl or transport" tests/test_parallel.py \
    > "$OUT/pytest_nccl.txt" 2>&1 || status=1
  tail -n 5 "$OUT/pytest_nccl.txt"
else
  echo "mpi4py not installed: NCCL transport not checked" | tee "$OUT/pytest_nccl.txt"
fi

# the default ("auto", merged on CuPy), then "flat" (one im2col of dy for both gradients, no col2im),
# which was only ever timed on the CPU: bench_MODE.json and bench_MODE_flat.json
for layout in auto flat; do
  for mode in task hicd; do
    name=bench_${mode}$([ $layout = auto ] || echo _$layout).json
    timeout 120 python3 benchmarks/bench.py --backend cupy --mode $mode --batch 16 --size 256 --steps 20 --vs-torch --json \
      --conv-layout $layout > "$OUT/$name" 2>&1 || status=1
    tail -n 1 "$OUT/$name"
  done
done
# the second network (FC-Siam-diff, SPEC 4b), its task step against its CUDA twin
timeout 120 python3 benchmarks/bench.py --backend cupy --model fc-siam-diff --mode task --batch 16 --size 256 --steps 20 \
  --vs-torch --json > "$OUT/bench_fc_task.json" 2>&1 || status=1
tail -n 1 "$OUT/bench_fc_task.json"
timeout 90 python3 benchmarks/bench_loss.py --backend cupy --repeats 50 > "$OUT/bench_loss.json" 2>&1 || status=1
tail -n 1 "$OUT/bench_loss.json"
timeout 120 python3 benchmarks/profile_layers.py --backend cupy --batch 16 --size 256 --torch > "$OUT/profile_cupy.jsonl" 2>&1 || status=1
tail -n 1 "$OUT/profile_cupy.jsonl"
# the whole pipeline on the GPU: training loop, evaluation, checkpoints, tiled prediction
timeout 150 python3 examples/train_cd.py --quick --backend cupy --no-progress --out "$OUT/quick_cupy" \
  > "$OUT/train_cd_quick_cupy.txt" 2>&1 || status=1
tail -n 8 "$OUT/train_cd_quick_cupy.txt"
python3 - <<'PY'
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for name in "ab":
    Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)).save(f"/tmp/hicd-{name}.png")
PY
timeout 60 python3 -m hicd_core.cli predict /tmp/hicd-a.png /tmp/hicd-b.png -o /tmp/hicd-change.png --tile 128 \
  --checkpoint "$OUT/quick_cupy/teacher/best.h5" --backend cupy >> "$OUT/train_cd_quick_cupy.txt" 2>&1 || status=1
tail -n 1 "$OUT/train_cd_quick_cupy.txt"
rm -rf "$OUT/quick_cupy"
echo "device_check.sh: ${SECONDS} s, exit status $status" | tee "$OUT/wall.txt"
exit $status
