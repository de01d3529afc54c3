#!/usr/bin/env bash
# The main job: fetch the default model, export a LoRA bundle, fine-tune it on the sample
# ticket-triage data, and show held-out loss and a generation before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
ET=${ET:-.venv/bin/edgetune}
OUT=${OUT:-out}
DATA=examples/data/tickets
SYSTEM="You triage customer support tickets. Reply with the category and the priority only."
PROMPT="My KettlePro arrived with a broken handle and I need a replacement urgently!"

mkdir -p "$OUT"
$ET models fetch smollm2-135m-instruct
if [ ! -f "$OUT/bundle/edgetune.json" ]; then
  $ET export smollm2-135m-instruct --out "$OUT/bundle" --rank 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj
fi
before=$($ET eval "$OUT/bundle" --data $DATA/test.jsonl --json)
gen_before=$($ET generate "$OUT/bundle" --system "$SYSTEM" -p "$PROMPT" -n 40 --json)
rm -rf "$OUT/run"
$ET train "$OUT/bundle" --data $DATA --out "$OUT/run" --device cpu --steps 60 --batch-size 4 --lr 1e-3 \
    --warmup 5 --eval-every 20 --save-every 20
after=$($ET eval "$OUT/bundle" --adapter "$OUT/run" --data $DATA/test.jsonl --json)
gen_after=$($ET generate "$OUT/bundle" --adapter "$OUT/run" --system "$SYSTEM" -p "$PROMPT" -n 40 --json)

.venv/bin/python - "$before" "$after" "$gen_before" "$gen_after" <<'PY'
import json, sys
b, a, gb, ga = (json.loads(x) for x in sys.argv[1:])
print("\n=== held-out test loss (32 tickets never seen in training) ===")
print(f"before: {b['loss']:.4f} (perplexity {b['perplexity']:.2f})")
print(f"after:  {a['loss']:.4f} (perplexity {a['perplexity']:.2f})")
print("\n=== generation, before ===\n" + gb["text"])
print("\n=== generation, after ===\n" + ga["text"])
PY
echo -e "\nloss curve: $OUT/run/loss.png   adapter (PEFT format): $OUT/run/adapter"
