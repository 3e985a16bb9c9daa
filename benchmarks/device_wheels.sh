#!/usr/bin/env bash
# Download, here (where pip reaches a package index), the wheels that benchmarks/device_check.sh
# needs on a lent GPU machine and its image lacks, into .whl/ (kept out of git by
# .git/info/exclude, as the device tool's notes say).  PYVER: the device's Python (3.12 there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
# Versions this project is tested with (README); their own needs the image lacks are listed too.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl \
    openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6 \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
    tifffile==2026.3.3  # the image has a tifffile, maybe older than the mask writer was tested with
ls -1 .whl
du -sh .whl
