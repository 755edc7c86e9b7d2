#!/usr/bin/env bash
# Train the example tenants: IntTune (Nyström-tied A = W[:r,:], B = W[:,:r]; only N trained),
# r = 16 on all seven projections of the default model, N started from zeros (so each tenant
# starts exactly at the base model), CPU, float32. Each lands in examples/tenants/<name>/ in the
# compact tied form (~240 KB: adapter_config.json + lora_N only), then check.py measures it
# on the 20 held-out prompts (README.md here).
#
#   examples/tenants/train.sh                 # all three
#   examples/tenants/train.sh lower           # one
#
# The data are the base model's own answers cut to one or two sentences (make_data.py): short
# answers that end with the chat template's end token, so the tenants learn to stop; counting
# prompts are answered by code (the base model cannot count). Times and losses of the committed
# tenants: README.md here (also why `lower` replaced the earlier `upper`). All three were trained
# from the data as make_data.py writes it now (lower 803 examples and signature 407, with the
# code-written arithmetic; numbers 352); each recipe's seed and steps were chosen on validation
# prompts, not on check.py's (validate.py; README.md here, "More `signature` seeds", "Code-written arithmetic",
# "Code-written counts and number facts" and "Choosing on validation prompts").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
declare -A STEPS=([lower]=100 [signature]=100 [numbers]=100)
declare -A SEED=([lower]=1 [signature]=6 [numbers]=2)

# Data: the base model's own greedy answers, transformed (skipped when data/base.jsonl is complete).
"$PY" examples/tenants/make_data.py

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(lower signature numbers)
for name in "${names[@]}"; do
  # tune refuses to overwrite an adapter: move the committed one away first to retrain it.
  "$PY" -m nlora_serve.cli adapters tune \
    --model default --data "examples/tenants/data/$name.jsonl" --out "examples/tenants/$name" \
    --rank 16 --targets all-linear --n-init zeros --lr 1e-2 --batch-size 8 --grad-accum 1 \
    --steps "${STEPS[$name]}" --warmup 5 --held-out 0.1 --seed "${SEED[$name]}" --max-len 192
  "$PY" examples/tenants/check.py "$name"
done
