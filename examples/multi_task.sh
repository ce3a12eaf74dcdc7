#!/usr/bin/env bash
# Several tasks on ONE shared backbone: tailor a pretrained ResNet-34 to traffic signs (GTSRB),
# house numbers (SVHN) and flowers (Flowers102), export every adapter into the same directory,
# then report the block usage of all tasks side by side.
#
#   bash examples/multi_task.sh
#   EPOCHS=5 TASKS="GTSRB:10:112 SVHN:auto:64" bash examples/multi_task.sh
#
# Datasets are downloaded by torchvision into ~/.cache/nettailor/datasets (about 1 GB in all);
# SVHN and Flowers102 need scipy to read their .mat files (pip install scipy).
# Meant for a GPU (used automatically). Re-running continues where it stopped (--resume).
set -euo pipefail

BACKBONE="${BACKBONE:-resnet34}"    # every task must use the same backbone AND weights to share it
RUNS="${RUNS:-runs/multi-${BACKBONE}}"  # one run directory per task under this folder
OUT="${OUT:-exports/multi-${BACKBONE}}" # the shared export directory
EPOCHS="${EPOCHS:-20}"              # epochs of each training stage
WEIGHTS="${WEIGHTS:-}"              # local backbone weights (.safetensors or timm .pth); empty: timm's pretrained
# torchvision dataset : K (universal blocks to drop, or "auto" to search it) : training image size
TASKS="${TASKS:-GTSRB:10:112 SVHN:11:64 Flowers102:7:224}"

if ! python -c "import scipy" 2>/dev/null; then
    echo "error: torchvision's SVHN and Flowers102 readers need scipy; run: pip install scipy" >&2
    exit 1
fi

for spec in $TASKS; do
    IFS=: read -r dataset k img_size <<< "$spec"
    task="$(echo "$dataset" | tr '[:upper:]' '[:lower:]')"
    args=(--data "torchvision:$dataset" --download --backbone "$BACKBONE" --img-size "$img_size"
          --epochs "$EPOCHS" --output "$RUNS/$task" --out "$OUT" --resume)
    if [[ -n "$WEIGHTS" ]]; then
        args+=(--weights "$WEIGHTS")
    fi
    if [[ "$k" != auto ]]; then
        args+=(--drop-blocks "$k")   # without it, `run` searches K within 0.5 points of the teacher
    fi
    echo "== $task: K=$k, ${img_size}px -> $RUNS/$task, adapter in $OUT/$task" >&2
    status=0
    nettailor run "${args[@]}" || status=$?
    if [[ $status -eq 7 ]]; then
        echo "warning: $task: the searched network misses the accuracy tolerance (exported anyway)" >&2
    elif [[ $status -ne 0 ]]; then
        echo "error: $task failed with exit code $status" >&2
        exit "$status"
    fi
done

echo "== all tasks on one backbone: $OUT" >&2
nettailor report "$OUT"
