#!/usr/bin/env bash
# NetTailor on GTSRB (German traffic signs, 43 classes) with a pretrained ResNet-34:
# teacher -> tailor -> prune -> finetune -> export -> report.
#
#   bash examples/gtsrb.sh                 # download GTSRB with torchvision (~350 MB, into ~/.cache/nettailor/datasets)
#   bash examples/gtsrb.sh /data/GTSRB     # or a local copy: the folder holding GTSRB/Training/000NN/...
#
# Settings below can be overridden from the environment, e.g. EPOCHS=5 K=8 bash examples/gtsrb.sh
# Meant for a GPU (used automatically); on a CPU the same commands work but take many hours.
# Re-running the script continues where it stopped: finished stages are kept (--resume).
set -euo pipefail

BACKBONE="${BACKBONE:-resnet34}"        # any supported timm ResNet; add WEIGHTS=file.safetensors to work offline
RUN="${RUN:-runs/gtsrb-${BACKBONE}}"    # run directory of the tailored network
TEACHER="${TEACHER:-${RUN}-teacher}"    # run directory of the fine-tuned teacher
OUT="${OUT:-exports/${BACKBONE}}"       # export directory: shared backbone + one adapter per task
EPOCHS="${EPOCHS:-}"                    # epochs of every training stage; empty: nettailor's (20, tailor 40)
K="${K:-10}"                            # universal blocks to drop, of 16 (authors on ResNet-34: SVHN 11, Flowers 7)
THRESHOLD="${THRESHOLD:-0.05}"          # proxies with attention below this are removed
IMG_SIZE="${IMG_SIZE:-112}"             # training size; 224 = the backbone's (the paper's), signs are 30-250 px
WEIGHTS="${WEIGHTS:-}"                  # local backbone weights (.safetensors or timm .pth); empty: timm's pretrained
DEVICE="${DEVICE:-auto}"

if [[ $# -ge 1 ]]; then
    DATA=(--data "$1")
else
    DATA=(--data torchvision:GTSRB --download)
fi
MODEL=(--backbone "$BACKBONE" --img-size "$IMG_SIZE")
EP=()
if [[ -n "$EPOCHS" ]]; then
    EP=(--epochs "$EPOCHS")
fi
if [[ -n "$WEIGHTS" ]]; then
    MODEL+=(--weights "$WEIGHTS")
fi

echo "== 1/6 teacher: fine-tune all of $BACKBONE on GTSRB -> $TEACHER" >&2
nettailor teacher "${DATA[@]}" "${MODEL[@]}" ${EP[@]+"${EP[@]}"} --device "$DEVICE" --output "$TEACHER" --resume

echo "== 2/6 tailor: frozen blocks + proxies + attention, taught by the teacher -> $RUN" >&2
nettailor tailor "${DATA[@]}" "${MODEL[@]}" --teacher "$TEACHER" ${EP[@]+"${EP[@]}"} --device "$DEVICE" \
    --output "$RUN" --resume

echo "== 3/6 prune: proxies below $THRESHOLD and the $K weakest blocks" >&2
if [[ -f "$RUN/prune/summary.json" ]]; then
    if ! python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))
sys.exit(s["drop_blocks"] != int(sys.argv[2]) or abs(s["threshold"] - float(sys.argv[3])) > 1e-12)' \
            "$RUN/prune/summary.json" "$K" "$THRESHOLD"; then
        echo "error: $RUN was pruned with another K or THRESHOLD; rerun with those, or redo it with:" \
             "nettailor prune $RUN --threshold $THRESHOLD --drop-blocks $K --overwrite" >&2
        exit 2
    fi
    echo "prune: already done in $RUN with K=$K, threshold $THRESHOLD" >&2
else
    nettailor prune "$RUN" --threshold "$THRESHOLD" --drop-blocks "$K"
fi

echo "== 4/6 finetune the pruned network" >&2
nettailor finetune "$RUN" ${EP[@]+"${EP[@]}"} --device "$DEVICE" --resume

echo "== 5/6 export the adapter beside the shared backbone -> $OUT" >&2
nettailor export "$RUN" --export-dir "$OUT" --task-name gtsrb --overwrite

echo "== 6/6 report" >&2
nettailor report "$RUN"
nettailor report "$RUN" --json > "$RUN/report.json"
echo "report saved to $RUN/report.json; classify images with: nettailor predict $OUT IMAGE..." >&2
