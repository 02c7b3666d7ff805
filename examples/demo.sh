#!/usr/bin/env bash
# The main job on the built-in model: init a store, push a batch of facts, audit it,
# roll it back and see the model answer as before. Uses its own store, stores/demo.h5.
set -euo pipefail
cd "$(dirname "$0")/.."
LL=.venv/bin/lifelong
export LIFELONG_STORE=stores/demo.h5
rm -rf stores/demo.h5 stores/demo.h5.d stores/demo.h5.lock   # the demo's own store only

ASK=("The mother tongue of Danielle Darrieux is" "Kryvyi Rih belongs to the continent of" "Tapio Kantanen is a citizen of")

echo "== 1. init: a store for SmolLM2-135M (first run converts the GGUF once)"
$LL init --model smollm2-135m
$LL status

echo; echo "== 2. the model before any edit"
$LL ask "${ASK[@]}"

echo; echo "== 3. a malformed batch is refused whole, nothing stored (exit 2)"
set +e; $LL push examples/bad_facts.jsonl; echo "exit code: $?"; set -e

echo; echo "== 4. push examples/facts.jsonl"
$LL push examples/facts.jsonl
$LL ask "${ASK[@]}"

echo; echo "== 5. audit"
$LL log
$LL eval

echo; echo "== 6. roll back to the base model: answers as before"
$LL rollback --to 0
$LL ask "${ASK[@]}"
$LL log
