#!/usr/bin/env bash
# CUDA decode of random 4-bit GPTQ checkpoints with the exact shapes of chatglm3-6b and glm-4-9b-chat
# (output layer int8 per channel), with and without CUDA graphs. Needs a GPU and ~8 GB of disk under $DIR.
set -euo pipefail
DIR=${DIR:-/tmp/lowvram-cuda}
mkdir -p "$DIR"
for MODEL in ${MODELS:-chatglm3-6b glm-4-9b-chat}; do
  for BITS in ${BITS:-4}; do
    OUT="$DIR/$MODEL-int$BITS"
    [ -d "$OUT" ] || python -m lowvram.converters.fullsize "$MODEL" --bits "$BITS" -o "$OUT" >/dev/null
    for GRAPH in "" --cuda-graph; do
      lowvram bench "$OUT" --device cuda --prompt-len ${PROMPT:-512} --decode-steps ${STEPS:-64} $GRAPH --json
    done
  done
done
