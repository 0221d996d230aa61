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

echo "== 4. pipeline: train and evaluate the four bundles (resumes, skips finished stages)"
"$MRNGAN_PY" -m monai_mrngan pipeline --dataset_dir "$WORK/prepared" --workdir "$WORK/run" --preset demo

echo "== 5. reconstruct a whole volume from one held-out slice"
read -r VOL IDX < <("$MRNGAN_PY" - "$WORK/prepared" <<'PY'
import sys
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.positions import index_for_position
entry = load_split(sys.argv[1], "test")[0]
print(entry["image"], index_for_position(entry["positions"], 0.5))
PY
)
"$MRNGAN_PY" -m monai_mrngan reconstruct --workdir "$WORK/run" --input "$VOL" --slice-index "$IDX" \
  --out "$WORK/reconstruction/recon.nii.gz"

echo
echo "prepared dataset:     $WORK/prepared (datalist.json, prepare_report.json, volumes/)"
echo "trained stages:       $WORK/run/<stage>/models, TensorBoard: tensorboard --logdir $WORK/run"
echo "evaluation report:    $(ls "$WORK"/run/mrngan/eval/*/report.json "$WORK"/run/mrngan/eval/report.json 2>/dev/null | head -1)"
echo "reconstructed volume: $WORK/reconstruction/recon.nii.gz (montage: recon_montage.png)"
