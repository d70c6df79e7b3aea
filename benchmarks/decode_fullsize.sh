#!/usr/bin/env bash
# Full-size decode/prefill/RSS of lowvram on random ChatGLM3-6B-shaped GPTQ checkpoints (4 and 8 bits,
# output layer int8), 2 threads. Needs ~8 GB of disk under $DIR and ~4-7 GB RAM.
set -euo pipefail
DIR=${DIR:-/tmp/lowvram-bench}
MODEL=${MODEL:-chatglm3-6b}
mkdir -p "$DIR"
for BITS in ${BITS:-4 8}; do
  OUT="$DIR/$MODEL-int$BITS"
  [ -d "$OUT" ] || python -m lowvram.converters.fullsize "$MODEL" --bits "$BITS" -o "$OUT"
  lowvram bench "$OUT" --threads 2 --prompt-len 512 --decode-steps 24 --json
done
