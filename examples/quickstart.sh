#!/usr/bin/env bash
# Quick start: install into .venv, write a synthetic H&E demo slide (a real pyramidal Aperio SVS),
# and segment it with the tissue model that ships with the package. Outputs go to demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p demo
[ -f demo/demo.svs ] || .venv/bin/wsi-espnet demo-slide demo/demo.svs --size 8192x6144 --seed 7 --truth demo/demo.truth.png
.venv/bin/wsi-segment demo/demo.svs --out demo/demo.mask.tif \
    --geojson demo/demo.geojson --overlay demo/demo.overlay.png --probs demo/demo.probs.zarr --overwrite
echo "Open demo/demo.overlay.png, or demo/demo.svs in QuPath and drop demo/demo.geojson on it (examples/QUPATH.md)."
