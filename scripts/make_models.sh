#!/usr/bin/env bash
# Rebuild a shipped model from nothing (`make models BUDGET=standard MODEL=...`):
#   simulated recording (webp:85 tokens, what the nodes send) -> SPAR pretraining -> two teacher
#   candidates on that encoder: frozen-encoder heads (the paper's protocol) and full fine-tuning
#   (encoder + heads end to end, layer-wise lr decay) -> the better one on validation is the
#   teacher -> loss-robust distillation into a small student -> FP32 ONNX -> INT8 ONNX, and the
#   teacher's own ONNX in OUT/teacher/ for comparison. Every ONNX gets a manifest.
#
# MODEL: parking_lot (default: one vehicle, classification + localization, configs/sites/parking_lot.toml),
# parking_lot_multi (up to three vehicles, node-anchored DETR detection; its encoder is the parking lot's,
# pretrained without labels on the same sensors: ENCODER_FROM, default build/models-standard/spar)
# or ridgecrest_like (earthquake hypocentres, configs/sites/ridgecrest_like.toml).
# BUDGET (train/budgets.py): smoke (default, ~10 min, a plumbing check, written to
# build/models-smoke/out unless OUT is set) or standard (1-2 h on 2 cores: the shipped model,
# written to models/$MODEL). Stages whose output exists are skipped, and pretraining resumes
# from its last epoch, so an interrupted build continues where it stopped. Deterministic: fixed
# seeds and a fixed thread count.
set -euo pipefail

BIN=${VENV:-.venv}/bin
BUDGET=${BUDGET:-smoke}
eval "$("$BIN/python" -m train.budgets "$BUDGET" --shell)"
MODEL=${MODEL:-parking_lot}
case "$MODEL" in
    parking_lot)
        WORK=${WORK:-build/models-$BUDGET}; VERSION=${VERSION:-0.4.0}; NAME=spar-parking-lot
        SCENARIO=parking_lot; SCENARIO_PARAMS=(--param max_vehicles=1 --param empty_fraction=0.1)
        SCENARIO_NOTE="parking_lot, max_vehicles=1, empty_fraction=0.1, webp:85 tokens"
        STUDENT_FLAGS=$BUDGET_STUDENT ;;
    parking_lot_multi)
        WORK=${WORK:-build/models-parking_lot_multi-$BUDGET}; VERSION=${VERSION:-0.1.0}; NAME=spar-parking-lot-multi
        SCENARIO=parking_lot; SCENARIO_PARAMS=(--param max_vehicles=3 --param empty_fraction=0.1)
        SCENARIO_NOTE="parking_lot, max_vehicles=3, empty_fraction=0.1, webp:85 tokens"
        ENCODER_FROM=${ENCODER_FROM:-build/models-standard/spar}
        STUDENT_FLAGS=$BUDGET_STUDENT ;;
    ridgecrest_like)
        WORK=${WORK:-build/models-ridgecrest_like-$BUDGET}; VERSION=${VERSION:-0.1.0}; NAME=spar-ridgecrest
        SCENARIO=earthquakes; SCENARIO_PARAMS=(--param missing_trace_fraction=0.2)
        SCENARIO_NOTE="earthquakes on ridgecrest_like, 20 % of the traces missing, webp:85 tokens"
        # A station's 30 tokens are 5 frequency x 6 time patches: merging them would blur the P onset
        # that locates the event, so the seismic student keeps one token per patch.
        STUDENT_FLAGS=$(sed -E 's/--token-merge [0-9]+//' <<< "$BUDGET_STUDENT") ;;
    *) echo "unknown MODEL $MODEL; known: parking_lot, parking_lot_multi, ridgecrest_like" >&2; exit 2 ;;
esac
if [ "$BUDGET" = standard ]; then OUT=${OUT:-models/$MODEL}; else OUT=${OUT:-$WORK/out}; fi
THREADS=${THREADS:-2}  # torch threads; 1 when another training shares the two cores
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$WORK" "$OUT"
LOG="$WORK/commands.log"

run() {  # log every command with its start time, so the artifacts name what made them
    echo "[$(date -u +%FT%TZ)] $*" >> "$LOG"
    echo "+ $*" >&2
    "$@"
}

dataset() {  # dataset DIR WINDOWS SEED
    [ -f "$1/dataset.json" ] && return 0
    run "$BIN/spar-node" dataset --scenario "$SCENARIO" --windows "$2" --seed "$3" --codec webp:85 --out "$1" \
        --shard-size 1000 "${SCENARIO_PARAMS[@]}" --overwrite
}

done_marker() { [ -f "$1/checkpoint.pt" ] || [ -f "$1/classify/checkpoint.pt" ]; }

echo "# make models, model $MODEL, $BUDGET_NAME budget ($BUDGET_NOTE), $THREADS threads" | tee -a "$LOG"
dataset "$WORK/data" "$BUDGET_WINDOWS" 11
dataset "$WORK/test" "$BUDGET_TEST_WINDOWS" 1207   # another recording: never trained on
if [ -n "${ENCODER_FROM:-}" ] && [ ! -f "$WORK/spar/done" ]; then
    # Self-supervised pretraining needs no labels: one encoder serves every model of the same sensors.
    [ -f "$ENCODER_FROM/done" ] || { echo "no pretrained encoder in $ENCODER_FROM: build the parking-lot model" \
        "first (make models BUDGET=standard) or set ENCODER_FROM" >&2; exit 1; }
    run cp -r "$ENCODER_FROM" "$WORK/spar"
fi
# shellcheck disable=SC2086  # BUDGET_TEACHER_MODEL is a list of flags
[ -f "$WORK/spar/done" ] || { run "$BIN/spar-train" pretrain --data "$WORK/data" --out "$WORK/spar" --objective spar \
    --epochs "$BUDGET_PRETRAIN_EPOCHS" --seed 0 --batch-size 32 --lr 1e-3 --no-progress $BUDGET_TEACHER_MODEL \
    && touch "$WORK/spar/done"; }

if [ "$MODEL" = parking_lot ]; then
    # Candidate 1: heads on the frozen encoder (classification with SPAR's one-block transformer head).
    done_marker "$WORK/frozen/classify" || run "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" \
        --task classify --head transformer --steps "$BUDGET_HEAD_STEPS" --seed 0 --out "$WORK/frozen/classify" --no-progress
    done_marker "$WORK/frozen/localize" || run "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" \
        --task localize --steps "$BUDGET_HEAD_STEPS" --seed 0 --out "$WORK/frozen/localize" --no-progress
    # Candidate 2: full fine-tuning, one encoder shared by both heads.
    done_marker "$WORK/full" || run "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" \
        --task classify,localize --head transformer --unfreeze --epochs "$BUDGET_FINETUNE_EPOCHS" --lr 5e-4 \
        --seed 0 --out "$WORK/full" --no-progress
    CANDIDATES=(--candidate "frozen=$WORK/frozen/classify,$WORK/frozen/localize"
                --candidate "full=$WORK/full/classify,$WORK/full/localize")
elif [ "$MODEL" = parking_lot_multi ]; then
    # Candidate 1: the node-anchored DETR detector (train/heads/anchor_detector.py) on the frozen
    # encoder, twice the budget's head steps (a set loss with Hungarian matching converges slower than
    # a plain regression: the plain DETR head was still improving at 7,000 steps); 2: full fine-tuning.
    done_marker "$WORK/frozen/detect" || run "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" \
        --task detect --head anchors --steps "$((2 * BUDGET_HEAD_STEPS))" --seed 0 --out "$WORK/frozen/detect" \
        --no-progress
    done_marker "$WORK/full/detect" || run "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" \
        --task detect --head anchors --unfreeze --epochs "$BUDGET_FINETUNE_EPOCHS" --lr 5e-4 --seed 0 \
        --out "$WORK/full/detect" --no-progress
    CANDIDATES=(--candidate "frozen=$WORK/frozen/detect" --candidate "full=$WORK/full/detect")
else
    # Candidate 1: the hypocentre head (two transformer blocks) on the frozen encoder; 2: full fine-tuning.
    done_marker "$WORK/frozen/quake" || run "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" \
        --task quake --steps "$BUDGET_HEAD_STEPS" --seed 0 --out "$WORK/frozen/quake" --no-progress
    done_marker "$WORK/full/quake" || run "$BIN/spar-train" finetune --data "$WORK/data" --encoder "$WORK/spar" \
        --task quake --unfreeze --epochs "$BUDGET_FINETUNE_EPOCHS" --lr 5e-4 --seed 0 --out "$WORK/full/quake" \
        --no-progress
    CANDIDATES=(--candidate "frozen=$WORK/frozen/quake" --candidate "full=$WORK/full/quake")
fi

mapfile -t TEACHER < <(run "$BIN/spar-export" choose-teacher --report "$WORK/teacher-choice.md" "${CANDIDATES[@]}")
[ "${#TEACHER[@]}" -gt 0 ] || { echo "choose-teacher chose nothing (see the error above)" >&2; exit 1; }
printf '%s\n' "${TEACHER[@]}" > "$WORK/teacher.txt"   # spar-bench quant reads the choice
TEACHER_FLAGS=()
for t in "${TEACHER[@]}"; do TEACHER_FLAGS+=(--teacher "$t"); done

# Loss-robust distillation: the student learns the teacher's complete-window answers from windows
# that lost up to 40 % of their token messages (what a lossy link delivers). Its shape is the budget's.
# DISTILL=0 ships the teacher itself (one checkpoint) as the model, when there is no time to distil.
DISTILL=${DISTILL:-1}
if [ "$DISTILL" = 1 ]; then
    # shellcheck disable=SC2086  # STUDENT_FLAGS is a list of flags
    done_marker "$WORK/student" || run "$BIN/spar-export" distill "${TEACHER_FLAGS[@]}" --data "$WORK/data" \
        --out "$WORK/student" --epochs "$BUDGET_DISTILL_EPOCHS" --seed 0 --message-loss 0.4 --no-progress $STUDENT_FLAGS
    SHIPPED=$WORK/student
else
    [ "${#TEACHER[@]}" = 1 ] || { echo "DISTILL=0 ships a one-checkpoint teacher only" >&2; exit 1; }
    SHIPPED=${TEACHER[0]}
fi

rm -rf "${OUT:?}"/*
run "$BIN/spar-export" onnx --checkpoint "$SHIPPED" --data "$WORK/data" --out "$OUT" \
    --name "$NAME" --version "$VERSION"
run "$BIN/spar-export" quantize --onnx "$OUT/model.onnx" --checkpoint "$SHIPPED" --data "$WORK/data" \
    --calibration-windows "$BUDGET_CALIBRATION_WINDOWS"
# model.onnx has fused attention (ONNX Runtime); TensorRT engines are built from the plain graph beside it
# and from its own INT8 (export/formats.py)
if [ -f "$OUT/model.plain.onnx" ]; then
    run "$BIN/spar-export" quantize --onnx "$OUT/model.plain.onnx" --checkpoint "$SHIPPED" --data "$WORK/data" \
        --calibration-windows "$BUDGET_CALIBRATION_WINDOWS"
fi
if [ "$DISTILL" = 1 ]; then
    run "$BIN/spar-export" onnx "${TEACHER_FLAGS[@]/--teacher/--checkpoint}" --data "$WORK/data" --out "$OUT/teacher" \
        --name "$NAME-teacher" --version "$VERSION"
fi
# Every manifest names the budget and the teacher's fine-tuning, so results measured on it can say so.
TEACHER_MODE=$(head -n1 < <(grep -o '^| [a-z]* (chosen)' "$WORK/teacher-choice.md" | tr -d '|' | awk '{print $1}'))
"$BIN/python" - "$OUT" "$BUDGET_NAME" "$TEACHER_MODE" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$SCENARIO_NOTE" "$DISTILL" <<'PY'
import json, pathlib, sys
out, budget, teacher, commit, scenario, distill = sys.argv[1:]
for path in pathlib.Path(out).rglob("*manifest.json"):
    data = json.loads(path.read_text())
    data["training"] = {"budget": budget, "teacher_fine_tuning": teacher, "commit": commit,
                        "scenario": scenario,
                        "student": distill == "1" and "teacher" not in path.parts}
    path.write_text(json.dumps(data, indent=2) + "\n")
PY
[ "$DISTILL" = 1 ] && cp "$WORK/student/report.md" "$OUT/distillation.md"
cp "$WORK/teacher-choice.md" "$OUT/teacher-choice.md"
{
    echo "# How this model was trained"
    echo
    echo "Budget \`$BUDGET_NAME\`: $BUDGET_NOTE. Built by \`make models BUDGET=$BUDGET_NAME MODEL=$MODEL\` at commit"
    echo "$(git rev-parse --short HEAD 2>/dev/null || echo unknown) on $(uname -m), $(nproc --all) cores (THREADS=$THREADS), finished $(date -u +%FT%TZ)."
    if [ "$DISTILL" != 1 ]; then
        echo
        echo "DISTILL=0: no student was distilled; model.onnx is the chosen teacher itself (teacher-choice.md)."
    fi
    echo
    echo "Pretraining log (epoch, train loss, validation loss, seconds):"
    echo
    echo '```'
    "$BIN/python" -c 'import json,sys
for line in open(sys.argv[1]):
    r = json.loads(line); print(r["epoch"], round(r["train_loss"], 4), round(r["val_loss"], 4), r["seconds"])' \
        "$WORK/spar/log.jsonl"
    echo '```'
    echo
    echo "Commands, in order:"
    echo
    echo '```'
    cat "$LOG"
    echo '```'
} > "$OUT/TRAINING.md"
ls -l "$OUT"
