#!/usr/bin/env bash
# Train the shipped shapes detector on the lent GPU (the shipped one was trained on an H100) (one device call, no carried files):
#   run: bash tests/gpu/train_detector_h200.sh
# Writes $OUT/shapes-yolov5n.safetensors and $OUT/train.log; copy the weights to models/detector/.
set -euo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m tandem_serve.vision.train --out "$out/shapes-yolov5n.safetensors" --size n \
    --iterations 4000 --max-minutes "${TRAIN_MINUTES:-7}" --batch 64 --workers 14 --eval-images 300 \
    --seed 0 --log-every 100 2>&1 | tee "$out/train.log"
