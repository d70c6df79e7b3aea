#!/usr/bin/env bash
# Everything this project checks on a GPU, in phases that each fit one device call (~10 min):
#   bash benchmarks/gpu_check.sh tests     # every test that needs CUDA (kernels, graphs, GPTQ on cuda, GPU+CPU split,
#                                          # bitsandbytes on cuda: put its wheel in benchmarks/wheels/ and carry that)
#   bash benchmarks/gpu_check.sh decode    # issue 5: 4-bit decode of chatglm3-6b / glm-4-9b-chat shapes, +/- CUDA graphs
#   bash benchmarks/gpu_check.sh offload   # issue 6: 6 and 4 GiB caps, split/streaming, memory model at 8K under 8 GiB
#   bash benchmarks/gpu_check.sh accelerate  # issue 6: the same with transformers+accelerate's bf16 offload beside it
# Results go to $OUT (the device tool's output folder) or ./gpu-results.
set -euo pipefail
case "${1:-tests}" in
  tests|decode|offload|accelerate) ;;
  *) echo "unknown phase $1: tests, decode, offload or accelerate" >&2; exit 2 ;;
esac
R=${OUT:-gpu-results}
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1 || true
case "${1:-tests}" in
  tests)
    # bitsandbytes (the optional bnb backend) from a wheel carried in benchmarks/wheels/, the GPU machine being offline
    if ! python -c "import bitsandbytes" 2>/dev/null && ls benchmarks/wheels/bitsandbytes-*.whl >/dev/null 2>&1; then
      python -m pip install -q --no-deps benchmarks/wheels/bitsandbytes-*.whl || true
    fi
    python -m pytest -q -rs tests/test_kernels.py tests/test_quantize.py tests/test_placement.py -k "cuda or gpu" \
      2>&1 | tee "$R/tests.txt" ;;
  decode)
    bash benchmarks/cuda_decode.sh 2>&1 | tee "$R/decode.txt" ;;
  offload)
    python benchmarks/offload.py --json "$R/offload.json" 2>&1 | tee "$R/offload.txt" ;;
  accelerate)
    python benchmarks/offload.py --accelerate --json "$R/accelerate.json" 2>&1 | tee "$R/accelerate.txt" ;;
esac
