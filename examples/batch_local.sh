#!/usr/bin/env bash
# Segment an archive of slides on this machine with wsi-batch (a Dask LocalCluster).
#
#   bash examples/batch_local.sh [WORK_DIR]        # default WORK_DIR: ./batch_demo
#   MODEL=path/to/model.pt bash examples/batch_local.sh
#
# It writes a small archive of synthetic demo slides in case folders (plus one corrupt file, to show
# what a failure looks like), segments it, shows the report, then runs the same command again: the
# second run skips every finished slide.  Nothing here needs a GPU; on a GPU machine wsi-batch starts
# one worker per GPU by itself.
set -euo pipefail

# The commands of the environment examples/quickstart.sh made, unless wsi-batch is on PATH already
# (an activated venv, or a pip install elsewhere).
VENV_BIN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin"
if ! command -v wsi-batch >/dev/null && [ -x "$VENV_BIN/wsi-batch" ]; then
    export PATH="$VENV_BIN:$PATH"
fi
command -v wsi-batch >/dev/null || { echo "error: wsi-batch not found: run bash examples/quickstart.sh first, or activate the environment it is installed in" >&2; exit 2; }

WORK="${1:-batch_demo}"
ARCHIVE="$WORK/archive"
OUT="$WORK/results"
mkdir -p "$ARCHIVE/case-001/block-A" "$ARCHIVE/case-001/block-B" "$ARCHIVE/case-002"

# 1. An archive: demo slides with known content (see `wsi-espnet demo-slide --help`).
for spec in "case-001/block-A/S1.svs 4096x3072 1" "case-001/block-B/S2.svs 3072x3072 2" \
            "case-002/S3.svs 4096x4096 3" "case-002/S4.ome.tif 2048x2048 4"; do
    set -- $spec
    [ -e "$ARCHIVE/$1" ] || wsi-espnet demo-slide "$ARCHIVE/$1" --size "$2" --seed "$3"
done
head -c 100000 /dev/urandom > "$ARCHIVE/case-002/corrupt.svs"   # a file no reader can open

# 2. The model: the one shipped with the package, unless MODEL names another.  Without a shipped
#    model yet (a development checkout), make a random-weight ESPNet: the pipeline runs, the
#    classes mean nothing.
MODEL_ARGS=()
if [ -n "${MODEL:-}" ]; then
    MODEL_ARGS=(--model "$MODEL")
elif ! python -c "from wsi_espnet.checkpoint import DEFAULT_MODEL; import sys; sys.exit(not DEFAULT_MODEL.is_file())"; then
    echo "no shipped model in this checkout: using an UNTRAINED random-weight ESPNet (pipeline demo only)"
    python - "$WORK/untrained.pt" <<'EOF'
import sys, wsi_espnet
wsi_espnet.save_checkpoint(sys.argv[1], wsi_espnet.ESPNet(8, 2, 8), wsi_espnet.load_config("breast_biopsy"))
EOF
    MODEL_ARGS=(--model "$WORK/untrained.pt")
fi

# 3. The batch.  --workers 2: two worker processes, one slide each at a time, the cores shared out
#    as PyTorch threads (leave it out to size the cluster to the machine).  Exit code 1: some slides
#    failed (here the corrupt one); the others are done regardless.
set +e
wsi-batch "$ARCHIVE" --out "$OUT" "${MODEL_ARGS[@]}" --workers 2 --geojson
status=$?
set -e
echo "exit code: $status (0 all done, 1 some failed, 2 a mistake in the command)"

# Outputs mirror the archive: results/case-001/block-A/S1.mask.tif, S1.geojson, ...
find "$OUT" -name '*.mask.tif' | sort
column -s, -t < "$OUT/report.csv" | cut -c1-160

# 4. The same command again: finished slides are skipped, failed ones are tried again (and fail
#    again, at once: an unreadable file is not retried within a run).  Had the first run been
#    interrupted (Ctrl-C, a crash, a killed worker), this would resume the partial slides.
wsi-batch "$ARCHIVE" --out "$OUT" "${MODEL_ARGS[@]}" --workers 2 --geojson --quiet || true

# Other inputs: a glob (quote it) or a CSV manifest with per-slide options, e.g.
#   wsi-batch "$ARCHIVE/**/*.svs" --out "$OUT"
#   printf 'slide,mpp,out\ncase-002/S3.svs,0.25,S3-rescan\n' > "$ARCHIVE/list.csv"
#   wsi-batch "$ARCHIVE/list.csv" --out "$OUT"
