#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one prepared run (about 8 minutes on an H100/H200).
#   bash benchmarks/gpu_run.sh OUT_DIR [MBPP_JSONL]
# Sections run longest-value-first, each under its own time limit; results stream to OUT_DIR/results.jsonl.
set -u
OUT_DIR=${1:-bench_out}
DATA=${2:-../shared/data/mbpp/mbpp_release_v1.jsonl}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export BENCH_RUN_ID=${BENCH_RUN_ID:-gpu-$(date -u +%Y%m%dT%H%M%S)}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/device.txt"
$PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT_DIR/device.txt"
section() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  echo "=== $name exit $? $(date -u +%T)"
  grep -E '^\{"bench"' "$OUT_DIR/$name.log" | cut -c1-260
  grep -E 'Error|error|Traceback' "$OUT_DIR/$name.log" | grep -v '"bench"' | tail -5
}
section train_phi2 ${TRAIN_LIMIT:-250} $PY -m benchmarks.bench_train --model phi-2 \
  --methods ${TRAIN_METHODS:-peft-pt,pt,lopa,peft-lora,lora,fft,idpg} --steps 8 --warmup 3 --padding \
  --data_path "$DATA" --results "$OUT_DIR/results.jsonl"
section generate_phi2 ${GEN_LIMIT:-210} $PY -m benchmarks.bench_generate --model phi-2 \
  --methods ${GEN_METHODS:-lopa,pt,none,hf-generate} --batch_sizes 64,16,1 --data_path "$DATA" \
  --results "$OUT_DIR/results.jsonl"
section train_deepseek ${DS_LIMIT:-70} $PY -m benchmarks.bench_train --model deepseek-coder-1.3b-base \
  --methods pt,lopa,peft-pt,lora,peft-lora --steps 6 --warmup 3 --results "$OUT_DIR/results.jsonl"
echo "=== done $(date -u +%T)"
