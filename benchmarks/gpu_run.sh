#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md, as prepared runs on the device machine (H100 or H200).
#   bash benchmarks/gpu_run.sh OUT_DIR [MBPP_JSONL] [SECTIONS]
# SECTIONS, a comma list, in the order they run (times as measured on an H100, sessions 8 and 13):
#   train_phi2     every method at 8 x 512, then the four padding modes (156 s)
#   padding_graphs phi-2's four padding modes, lengths padded to a multiple of 64, twice: with the decoder layers
#                  under CUDA graphs (--compile_mode reduce-overhead), then compiled as the trainer does: how much of
#                  the padding modes' ~58 ms floor per step is the host's launches; PADG_BATCHES (default 30) batches
#                  per mode (199-236 s with 20 batches, sessions 19-20). Packed rows are rounded to the multiple too,
#                  as the trainer's (since session 20; session 19's packed lines were not: a best case).
#                  PADG_MODEL (default phi-2) and PADG_BATCH (default 8) pick the model and batch size: with
#                  PADG_MODEL=Meta-Llama-3-8B PADG_BATCH=2 (the trainer's default batch) PADG_BATCHES=0 (the whole
#                  split) the lines' decoder_shapes and reserved_gib show the CUDA graphs' memory over an epoch's
#                  shapes against the default mode's (not yet run; 7-14 shapes per mode by --plan_only on a CPU)
#   generate_phi2  hf-generate, none, none-own, lopa, lopa-own, pt, none-own-full at batch 64/16/1, then the
#                  fast-vs-eager check (211 s for the four without -own in session 8). Each new shape compiles once;
#                  the -own methods share one compilation for all their shapes since session 14 (seen on the H100 in
#                  session 17: 28-31 s of warm-up for the first, 2.8 s for the next; in session 13 they compiled
#                  once per shape and KV bucket: hf-generate, none, none-own and lopa-own at batch 64 did not
#                  finish in 290 s, and lopa-own alone took 140 s).
#                  none-own-full attends over the whole cache (the buckets' A/B); none-own-static (not in this
#                  section's default GEN_METHODS) compiles per shape and bucket (the symbolic shapes' A/B). A line's
#                  warmup_seconds includes the compilations its warm-up caused: the first -own line's compilation,
#                  CUDA-graph recordings in later ones. GEN_NO_CHECK=1 leaves out the check.
#   generate_check only generate_phi2's fast-vs-eager check (bench_generate --check_only): the fast path's and the own
#                  loop's tokens against eager on 4 prompts, without the timings (on a freshly started H100 in
#                  session 17 it needed more than 165 s: compilations are slow until the machine's caches are warm)
#   generate_phi3  Phi-3-mini's architecture (2,047-token sliding window), none and none-own at batch 64: does
#                  fast decoding compile once per shape there (session 9 fix; not yet run, ~1.5 min estimated)?
#   train_deepseek (42 s)    train_llama3 (52 s without its FFT, which needs an H200)
#   encoder_ab     lopa on deepseek and phi-2 with the frozen encoder left eager (--eager_encoder), then replayed
#                  from CUDA graphs (--encoder_graphs; its line records the largest difference from eager); the train
#                  sections compile its layers, as the trainer does since session 11: compare with the same model's
#                  lopa line there (57 s for deepseek's two lines, session 13); AB_MODELS picks the models
#   graphs_ab      pt and lora on deepseek with the decoder layers compiled with CUDA graphs (--compile_mode
#                  reduce-overhead): how much of a step the host's launches cost (not yet run; ~1 min estimated)
#   cli_tiny       the README's tiny train -> generate -> postprocess -> evaluate through the real CLIs: bf16,
#                  --compile auto, fast decoding on and off, --decode_loop own and the default (auto) (75 s in
#                  session 8 with the first two; not done in 170 s on a fresh machine in session 17, whose training
#                  compiled for about a minute; each own-loop pass compiles again). Its runs go to
#                  CLI_DIR (default: a fresh temporary directory), so OUT_DIR stays a few files.
#   trainer_graphs the trainer's CUDA graphs through tune_foundation_model.py (tiny-llama PT and LOPA, each with
#                  --compile_mode default and with auto, the default; PT with auto under gradient accumulation;
#                  losses compared; benchmarks/trainer_graphs_check.sh). Its PT runs took 132 s on a warm H100 in
#                  session 20 (then three runs, before LOPA's were added). Its runs go to CLI_DIR too.
#   Default: all eleven. A device call may run 10 minutes and a session has 15 device minutes, so pick sections (and
#   *_METHODS) to fit.
# GEN_BATCHES (default 64,16,1) picks generate_phi2's batch sizes: each new shape compiles once, so fewer save time;
# GEN_NO_CHECK=1 skips its fast-vs-eager check (when generate_check runs it in the same call).
# Sections run under their own time limits (env *_LIMIT) so one slow section cannot eat the others; every
# figure streams to OUT_DIR/results.jsonl as it is made, so a cut-off section keeps what it measured.
set -u
OUT_DIR=${1:-bench_out}
DATA=${2:-../shared/data/mbpp/mbpp_release_v1.jsonl}
ALL=train_phi2,padding_graphs,generate_phi2,generate_check,generate_phi3
ALL+=,train_deepseek,train_llama3,encoder_ab,graphs_ab,cli_tiny,trainer_graphs
SECTIONS=,${3:-$ALL},
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export BENCH_RUN_ID=${BENCH_RUN_ID:-gpu-$(date -u +%Y%m%dT%H%M%S)}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT_DIR/device.txt"
$PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT_DIR/device.txt"
section() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  echo "=== $name exit $? $(date -u +%T)"
  grep -E '^\{"bench"' "$OUT_DIR/$name.log" | cut -c1-260
  grep -E 'Error|error|Traceback' "$OUT_DIR/$name.log" | grep -v '"bench"' | tail -5
}
wanted() { [[ $SECTIONS == *,$1,* ]]; }
# Baselines first in each pair, so a cut-off run still has every ratio it measured.
wanted train_phi2 && section train_phi2 ${TRAIN_LIMIT:-220} $PY -m benchmarks.bench_train --model phi-2 \
  --methods ${TRAIN_METHODS:-peft-pt,pt,lopa,peft-lora,lora,fft,idpg} --steps 8 --warmup 3 --padding \
  --data_path "$DATA" --results "$OUT_DIR/results.jsonl"
wanted padding_graphs && section padding_graphs ${PADG_LIMIT:-300} bash -c 'status=0; for mode in \
  reduce-overhead default; do "$0" -m benchmarks.bench_train --model $4 --batch_size $5 --methods "" --padding \
  --pad_multiple 64 --padding_batches $3 --compile_mode $mode --data_path "$1" --results "$2" || status=1; done
  exit $status' "$PY" "$DATA" "$OUT_DIR/results.jsonl" "${PADG_BATCHES:-30}" "${PADG_MODEL:-phi-2}" "${PADG_BATCH:-8}"
wanted generate_phi2 && section generate_phi2 ${GEN_LIMIT:-390} $PY -m benchmarks.bench_generate --model phi-2 \
  --methods ${GEN_METHODS:-hf-generate,none,none-own,lopa,lopa-own,pt,none-own-full} \
  --batch_sizes ${GEN_BATCHES:-64,16,1} ${GEN_NO_CHECK:+--no_check} \
  --data_path "$DATA" \
  --results "$OUT_DIR/results.jsonl"
wanted generate_check && section generate_check ${CHECK_LIMIT:-180} $PY -m benchmarks.bench_generate --model phi-2 \
  --check_only --data_path "$DATA" --results "$OUT_DIR/results.jsonl"
wanted generate_phi3 && section generate_phi3 ${PHI3_LIMIT:-150} $PY -m benchmarks.bench_generate --model phi-3 \
  --methods ${PHI3_METHODS:-none,none-own} --batch_sizes 64 --no_check --data_path "$DATA" \
  --results "$OUT_DIR/results.jsonl"
wanted train_deepseek && section train_deepseek ${DS_LIMIT:-100} $PY -m benchmarks.bench_train --model deepseek-coder-1.3b-base \
  --methods ${DS_METHODS:-peft-pt,pt,lopa,peft-lora,lora,idpg,fft} --steps 6 --warmup 3 \
  --results "$OUT_DIR/results.jsonl"
# FFT last: an 8B model's weights, gradients and AdamW states (~60 GiB in bf16) plus activations fit an H200
# (141 GiB); on an H100 (80 GiB) an estimate says 72-75 GiB (never run there); an out-of-memory error is recorded as
# that method's result line.
wanted train_llama3 && section train_llama3 ${LLAMA_LIMIT:-180} $PY -m benchmarks.bench_train --model Meta-Llama-3-8B \
  --methods ${LLAMA_METHODS:-peft-pt,pt,lopa,peft-lora,lora,fft} --steps 5 --warmup 3 \
  --results "$OUT_DIR/results.jsonl"
AB_MODELS=${AB_MODELS:-deepseek-coder-1.3b-base phi-2}
wanted encoder_ab && section encoder_ab ${AB_LIMIT:-180} bash -c 'status=0; for model in $2; do
  for variant in --eager_encoder --encoder_graphs; do  # a failed line must not lose the lines after it
    "$0" -m benchmarks.bench_train --model $model --methods lopa $variant --steps 6 --warmup 3 --results "$1" \
      || status=1; done; done; exit $status' "$PY" "$OUT_DIR/results.jsonl" "$AB_MODELS"
wanted graphs_ab && section graphs_ab ${GRAPHS_LIMIT:-150} $PY -m benchmarks.bench_train \
  --model ${GRAPHS_MODEL:-deepseek-coder-1.3b-base} --methods ${GRAPHS_METHODS:-pt,lora} \
  --compile_mode reduce-overhead --steps 6 --warmup 3 --results "$OUT_DIR/results.jsonl"
wanted cli_tiny && section cli_tiny ${CLI_LIMIT:-240} bash benchmarks/cli_check.sh "${CLI_DIR:-$(mktemp -d)}" "$DATA"
wanted trainer_graphs && section trainer_graphs ${TG_LIMIT:-300} bash benchmarks/trainer_graphs_check.sh \
  "${CLI_DIR:-$(mktemp -d)}" "$DATA"
echo "=== done $(date -u +%T)"
if [ -s "$OUT_DIR/results.jsonl" ]; then $PY -m benchmarks.summarize --results "$OUT_DIR/results.jsonl"; fi
