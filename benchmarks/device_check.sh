#!/usr/bin/env bash
# The GPU numbers issue 4 asks for, as one command for a lent CUDA machine (the `device` tool), so
# that a session lent one spends its few device minutes measuring rather than setting up.
#
# That machine's image has PyTorch with CUDA, numpy, tifffile, scikit-image, PyYAML and tqdm, and
# no network: the rest travels as wheels that benchmarks/device_wheels.sh downloads into .whl/
# here first.  Then, with the device tool:
#     run  command="bash benchmarks/device_check.sh"  carry=[".whl"]  timeout_s=540
# It prints (and leaves in $OUT/device_check.log):
#   1. the network alone, float32, on the paper's 1024x512 frame at batch 1 and 8 (`wsi-espnet bench`);
#   2. whole-slide throughput, end to end / model alone on the same tiles, on a 16384² demo slide
#      (`bench_segment_throughput.py --device cuda`: AMP, the `beside` schedule);
#   3. how far AMP moves the labels: one demo slide segmented on the GPU and on the CPU, the share of
#      mask pixels that agree.
# DEVICE=cpu runs the same steps on a CPU (to check the script itself without a GPU); SIZE,
# BATCHES, WORKERS and REPEATS shrink step 2, WHEELS names another wheel folder (none: install nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || {
        echo "error: the wheels in $WHEELS do not install here (device_wheels.sh fetches them for the device's" \
             "Python, PYVER=3.12); WHEELS=none runs without them" >&2
        exit 1
    }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
case "$DEVICE" in
    cpu | cuda | cuda:[0-9]*) ;;
    *) echo "error: DEVICE=$DEVICE: use cuda, cuda:N or cpu" >&2; exit 2 ;;
esac
WORK=$(mktemp -d)

{
    $PY -c "import torch, os; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device', '|', os.cpu_count(), 'CPUs')"

    echo; echo "== 1. the network alone (float32, random weights of the shipped architecture, 8 classes)"
    for batch in 1 8; do
        $PY -m wsi_espnet.cli bench --device "$DEVICE" --size 1024x512 --batch $batch --classes 8 \
            --mode optimized --repeats 50 --warmup 5
    done

    echo; echo "== 2. whole-slide throughput, end to end / model alone"
    $PY benchmarks/bench_segment_throughput.py --device "$DEVICE" --size "${SIZE:-16384}" \
        --batches "${BATCHES:-8,16,32}" --workers "${WORKERS:-4,8,16}" --repeats "${REPEATS:-2}" --profile \
        --workdir "$WORK"

    echo; echo "== 3. labels on $DEVICE vs cpu, one 8192² demo slide"
    $PY -m wsi_espnet.cli demo-slide "$WORK/agree.svs" --size 8192 --seed 3 >/dev/null
    $PY -m wsi_espnet.cli segment "$WORK/agree.svs" --out "$WORK/agree_$DEVICE.tif" --device "$DEVICE" --overwrite --quiet &&
    $PY -m wsi_espnet.cli segment "$WORK/agree.svs" --out "$WORK/agree_cpu.tif" --device cpu --overwrite --quiet &&
    $PY - "$WORK/agree_$DEVICE.tif" "$WORK/agree_cpu.tif" <<'EOF'
import sys

import numpy as np
import tifffile

a, b = (tifffile.imread(p, level=0) for p in sys.argv[1:3])
same = float(np.mean(a == b))
print(f"labels agree on {100 * same:.4f} % of {a.size:,} mask pixels ({sys.argv[1]} vs {sys.argv[2]})")
EOF
} 2>&1 | tee "$OUT/device_check.log"
rm -rf "$WORK"
