#!/usr/bin/env bash
# The trainer's --compile_mode reduce-overhead end to end (gpu_run.sh's trainer_graphs section; never yet run on a
# GPU): PT on tiny-llama (no dropout, so the losses are comparable) over 24 MBPP train examples, batch 4, with the
# default compile, with CUDA graphs, and with CUDA graphs under gradient accumulation 2 (batch 2; the gradients kept
# allocated between steps). Prints each run's losses and runtime fields and the largest relative difference from
# the default run; fails when a run fails, a loss differs by more than 2 % (bf16 autocast), or a run with CUDA graphs
# does not log that no compiled graph skipped its CUDA graph.
#   bash benchmarks/trainer_graphs_check.sh OUT_DIR MBPP_JSONL
set -eu
d=$1 data=$2
PY=${PYTHON:-python3}
common=(--peft_method pt --task_name mbpp --model_type tiny-llama --data_path "$data" --limit_train_examples 24
        --num_epochs 2 --lr 0.01 --compile on)
$PY tune_foundation_model.py "${common[@]}" --per_gpu_train_batch_size 4 --log_dir "$d/default"
$PY tune_foundation_model.py "${common[@]}" --per_gpu_train_batch_size 4 --compile_mode reduce-overhead \
  --log_dir "$d/graphs"
$PY tune_foundation_model.py "${common[@]}" --per_gpu_train_batch_size 2 --gradient_accumulation_steps 2 \
  --compile_mode reduce-overhead --log_dir "$d/graphs-accum"
$PY - "$d" <<'PYEOF'
import json, sys
def run(name):
    rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
    runtime = json.load(open(f"{sys.argv[1]}/{name}/config.json"))["runtime"]
    log = open(f"{sys.argv[1]}/{name}/train.log").read()
    return [r["loss"] for r in rows if "loss" in r], runtime, log
base = run("default")[0]
worst, failed = 0.0, []
for name in ("default", "graphs", "graphs-accum"):
    losses, rt, log = run(name)
    if rt["cuda_graphs"] and "no compiled graph skipped its CUDA graph" not in log:
        failed.append(f"{name}: CUDA graphs skipped (train.log)")
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses, base)) if len(losses) == len(base) else float("inf")
    worst = max(worst, diff)
    print(f"trainer_graphs: {name}: {len(losses)} steps, compile_mode {rt['compile_mode']}, cuda_graphs "
          f"{rt['cuda_graphs']}, pad_to_multiple_of {rt['pad_to_multiple_of']}, largest relative loss difference "
          f"from default {diff:.2e}; losses {[round(x, 4) for x in losses]}")
if worst > 0.02:
    failed.append(f"losses differ by {worst:.2e} (> 2 %)")
sys.exit("trainer_graphs: " + "; ".join(failed) if failed else 0)
PYEOF
