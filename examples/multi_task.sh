#!/usr/bin/env bash
# Several tasks on ONE shared backbone: tailor a pretrained ResNet-34 to traffic signs (GTSRB),
# house numbers (SVHN) and flowers (Flowers102), export every adapter into the same directory,
# then report the block usage of all tasks side by side.
#
#   bash examples/multi_task.sh
#   EPOCHS=5 TASKS="torchvision:GTSRB,10,112 /data/my_parts,auto,64" bash examples/multi_task.sh
#
# A task is DATA,K,IMG_SIZE: DATA is torchvision:NAME (downloaded into ~/.cache/nettailor/datasets)
# or a dataset folder of your own (any layout `nettailor` reads); the task is named after NAME
# (lower case) or the folder. K is the number of universal blocks to drop, or "auto" to search it.
# torchvision's SVHN and Flowers102 need scipy to read their .mat files (pip install scipy).
# Meant for a GPU (used automatically). Re-running continues where it stopped (--resume).
set -euo pipefail

BACKBONE="${BACKBONE:-resnet34}"    # every task must use the same backbone AND weights to share it
RUNS="${RUNS:-runs/multi-${BACKBONE}}"  # one run directory per task under this folder
OUT="${OUT:-exports/multi-${BACKBONE}}" # the shared export directory
EPOCHS="${EPOCHS:-}"                # epochs of every training stage; empty: nettailor's (20, tailor 40)
THRESHOLD="${THRESHOLD:-0.05}"      # proxies with attention below this are removed
DEVICE="${DEVICE:-auto}"
WEIGHTS="${WEIGHTS:-}"              # local backbone weights (.safetensors or timm .pth); empty: timm's pretrained
# DATA,K,IMG_SIZE per task (see above)
TASKS="${TASKS:-torchvision:GTSRB,10,112 torchvision:SVHN,11,64 torchvision:Flowers102,7,224}"

if [[ "$TASKS" =~ torchvision:(SVHN|Flowers102) ]] && ! python3 -c "import scipy" 2>/dev/null; then
    echo "error: torchvision's SVHN and Flowers102 readers need scipy; run: pip install scipy" >&2
    exit 1
fi

for spec in $TASKS; do
    IFS=, read -r data k img_size <<< "$spec"
    if [[ -z "$data" || -z "$k" || -z "$img_size" ]]; then
        echo "error: task '$spec' is not DATA,K,IMG_SIZE (e.g. torchvision:GTSRB,10,112 or /data/parts,auto,64)" >&2
        exit 2
    fi
    if [[ "$data" == torchvision:* ]]; then  # named as nettailor names it: gtsrb, or the folder's name
        task="$(echo "${data#torchvision:}" | tr '[:upper:]' '[:lower:]')"
    else
        task="$(basename "$data")"
    fi
    args=(--data "$data" --backbone "$BACKBONE" --img-size "$img_size"
          --threshold "$THRESHOLD" --device "$DEVICE" --output "$RUNS/$task" --export-dir "$OUT"
          --resume)
    if [[ -n "$EPOCHS" ]]; then
        args+=(--epochs "$EPOCHS")
    fi
    if [[ "$data" == torchvision:* ]]; then
        args+=(--download)
    fi
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
