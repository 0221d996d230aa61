#!/usr/bin/env bash
# The demo: make a synthetic phantom cohort, prepare it, and run the stages on it.
# Everything lands under $MRNGAN_DEMO_DIR (default ./workdir/demo); re-running reuses what is done.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
WORK="${MRNGAN_DEMO_DIR:-$REPO/workdir/demo}"
SUBJECTS="${MRNGAN_DEMO_SUBJECTS:-24}"
mkdir -p "$WORK"
export PYTHONWARNINGS="ignore::DeprecationWarning,ignore::FutureWarning"

if [ ! -f "$WORK/phantoms/dataset_description.json" ]; then
  echo "== 1. phantom cohort: $SUBJECTS synthetic T1 heads, 64^3 voxels of 4 mm"
  rm -rf "$WORK/phantoms"
  "$MRNGAN_PY" -m monai_mrngan phantoms --dst "$WORK/phantoms" --subjects "$SUBJECTS" --size 64 --seed 0
fi
if [ ! -f "$WORK/prepared/datalist.json" ]; then
  echo "== 2. prepare: RAS, 4 mm, 64 x 64 px, anatomical positions, split by subject"
  "$MRNGAN_PY" -m monai_mrngan prepare --src "$WORK/phantoms" --dst "$WORK/prepared" --spacing 4 --size 64 --overwrite
fi
echo "== 3. slice-sampling throughput"
"$MRNGAN_PY" scripts/benchmark_slices.py --dataset_dir "$WORK/prepared" --seconds 2
echo
echo "prepared dataset: $WORK/prepared (datalist.json, prepare_report.json, volumes/)"
