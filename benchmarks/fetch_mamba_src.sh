#!/usr/bin/env bash
# Put mamba-ssm's source distribution (2.3 or newer, the first to build with CUDA 13) in .mamba_src/, a
# git-ignored folder, on a machine that reaches PyPI. The GPU machines have nvcc but no network: carry the
# folder along, and benchmarks/gpu_check.sh builds only its selective-scan extension there, for that GPU, as
# the baseline of bench_scan.py. Nothing is built or installed here.
#   bash benchmarks/fetch_mamba_src.sh [DEST]      (MAMBA_SPEC picks another release, e.g. "mamba-ssm==2.3.2.post1")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
DEST=${1:-.mamba_src}
SPEC=${MAMBA_SPEC:-mamba-ssm>=2.3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# the source distribution only; its metadata step must not try to compile CUDA here or fetch torch
MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download "$SPEC" --no-binary :all: --no-deps --no-build-isolation \
  --quiet -d "$TMP" || { echo "fetch_mamba_src.sh: pip could not download $SPEC's source" >&2; exit 1; }
ARCHIVE=$(ls "$TMP"/mamba_ssm-*.tar.gz)
mkdir "$TMP/src"
tar xzf "$ARCHIVE" -C "$TMP/src" --strip-components=1
VERSION=$(sed -n 's/^Version: //p' "$TMP/src/PKG-INFO")
for f in csrc/selective_scan/selective_scan.cpp mamba_ssm/ops/selective_scan_interface.py; do
  [ -f "$TMP/src/$f" ] || { echo "fetch_mamba_src.sh: mamba-ssm $VERSION has no $f" >&2; exit 1; }
done
rm -rf "$DEST"
mv "$TMP/src" "$DEST"
echo "mamba-ssm $VERSION in $DEST ($(du -sh "$DEST" | cut -f1)); git ignores it: carry it to the GPU machine"
