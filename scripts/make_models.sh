#!/usr/bin/env bash
# Rebuild the shipped models from nothing (`make models`): simulated dataset -> SPAR pretraining ->
# classifier and localizer heads on the frozen encoder -> distilled student -> FP32 ONNX -> INT8 ONNX,
# each ONNX with its manifest. Deterministic: fixed seeds and a fixed thread count (CPU float
# reductions are reproducible for a given thread count). About 10 minutes on 2 CPU cores.
set -euo pipefail

BIN=${VENV:-.venv}/bin
WORK=${WORK:-build/models}
OUT=${OUT:-models/parking_lot}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
"$BIN/spar-node" dataset --scenario parking_lot --windows 1600 --seed 7 --out "$WORK/data" --shard-size 400 \
    --param max_vehicles=1 --param empty_fraction=0.1
"$BIN/spar-train" pretrain --data "$WORK/data" --out "$WORK/spar" --epochs 10 --seed 0 --no-progress
for task in classify localize; do
    "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" --task "$task" --steps 700 \
        --seed 0 --out "$WORK/$task" --no-progress
done
# Loss-robust distillation: the student learns the teacher's complete-window answers from windows
# that lost up to 40 % of their token messages (spar-bench lossy: 20 % loss cost +23 % localization
# error without it).
"$BIN/spar-export" distill --teacher "$WORK/classify" --teacher "$WORK/localize" --data "$WORK/data" \
    --out "$WORK/student" --seed 0 --message-loss 0.4 --no-progress
rm -f "$OUT"/*
"$BIN/spar-export" onnx --checkpoint "$WORK/student" --data "$WORK/data" --out "$OUT" \
    --name spar-parking-lot --version 0.2.0
"$BIN/spar-export" quantize --onnx "$OUT/model.onnx" --checkpoint "$WORK/student" --data "$WORK/data" \
    --calibration-windows 64
cp "$WORK/student/report.md" "$OUT/distillation.md"
ls -l "$OUT"
