#!/usr/bin/env bash
# Fine-tune the default model on one task's data and print the task's metric before and after.
#
#   bash examples/tasks/run.sh translation   # or: classification ner qa chat creative domain
#
# Uses .venv (make setup) and the bundle the demo uses (out/bundle: LoRA rank 8 on q,k,v,o).
set -euo pipefail
cd "$(dirname "$0")/../.."
TASK=${1:?"usage: bash examples/tasks/run.sh TASK (translation classification ner qa chat creative domain)"}
ET=${ET:-.venv/bin/edgetune}
OUT=${OUT:-out}
DATA=examples/tasks/$TASK
[ -d "$DATA" ] || { echo "Error: no task folder $DATA" >&2; exit 1; }
# steps, batch size, peak learning rate, longest generated reply
case $TASK in
  translation)    set -- 100 8 1e-3 64 ;;
  classification) set -- 80 8 1e-3 0 ;;
  ner)            set -- 150 8 1e-3 96 ;;
  qa)             set -- 60 4 1e-3 64 ;;
  chat)           set -- 40 4 5e-4 128 ;;
  creative)       set -- 60 8 5e-4 64 ;;
  domain)         set -- 60 8 5e-4 0 ;;
  *) echo "Error: unknown task $TASK" >&2; exit 1 ;;
esac
STEPS=$1 BS=$2 LR=$3 NEW=$4
start=$(date +%s)
$ET models fetch smollm2-135m-instruct >/dev/null
[ -f "$OUT/bundle/edgetune.json" ] || \
  $ET export smollm2-135m-instruct --out "$OUT/bundle" --rank 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj
RUN=$OUT/tasks/$TASK
rm -rf "$RUN" && mkdir -p "$OUT/tasks"
eval_args=(--data "$DATA/test.jsonl" --json)
[ "$NEW" != 0 ] && eval_args+=(--max-new-tokens "$NEW")
[ "$TASK" != domain ] && eval_args+=(--task "$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['task'])" "$DATA/task.json")")
mkdir -p "$RUN.eval"
$ET eval "$OUT/bundle" "${eval_args[@]}" --generations "$RUN.eval/before.jsonl" > "$RUN.eval/before.json"
$ET train "$OUT/bundle" --data "$DATA" --out "$RUN" --device cpu --steps "$STEPS" --batch-size "$BS" --lr "$LR" \
    --warmup 5 --eval-every 0 --save-every 0
$ET eval "$OUT/bundle" --adapter "$RUN" "${eval_args[@]}" --generations "$RUN.eval/after.jsonl" > "$RUN.eval/after.json"
end=$(date +%s)
.venv/bin/python examples/tasks/report.py "$TASK" "$RUN.eval/before.json" "$RUN.eval/after.json" $((end - start)) \
    | tee "$RUN.eval/summary.txt"
