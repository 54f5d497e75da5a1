#!/usr/bin/env bash
# The trainer's CUDA graphs end to end (gpu_run.sh's trainer_graphs section): PT and LOPA on tiny-llama (LOPA's
# encoder tiny-roberta; no dropout anywhere, so the losses are comparable) over 24 MBPP train examples, batch 4,
# each with --compile_mode default and with the default (auto: reduce-overhead on one GPU), and PT with auto under
# gradient accumulation 2 (batch 2; the gradients kept allocated between steps). Prints each run's losses and runtime
# fields and the largest relative difference from its method's default-mode run; fails when a run fails, a loss
# differs by more than 2 % (bf16 autocast), a run with CUDA graphs does not log that no compiled graph skipped its
# CUDA graph, or auto did not choose CUDA graphs (on a GPU). On a GPU each line also gives the most memory torch held
# (metrics.jsonl's gpu_peak_mem_gib, CUDA graphs' pools included).
#   bash benchmarks/trainer_graphs_check.sh OUT_DIR MBPP_JSONL
set -eu
d=$1 data=$2
PY=${PYTHON:-python3}
common=(--task_name mbpp --model_type tiny-llama --data_path "$data" --limit_train_examples 24 --num_epochs 2
        --lr 0.01 --compile on)
lopa=(--peft_method lopa --enc_model_type tiny-roberta --encoder_dropout False)
$PY tune_foundation_model.py --peft_method pt "${common[@]}" --per_gpu_train_batch_size 4 --compile_mode default \
  --log_dir "$d/pt-default"
$PY tune_foundation_model.py --peft_method pt "${common[@]}" --per_gpu_train_batch_size 4 --log_dir "$d/pt-auto"
$PY tune_foundation_model.py --peft_method pt "${common[@]}" --per_gpu_train_batch_size 2 \
  --gradient_accumulation_steps 2 --log_dir "$d/pt-auto-accum"
$PY tune_foundation_model.py "${lopa[@]}" "${common[@]}" --per_gpu_train_batch_size 4 --compile_mode default \
  --log_dir "$d/lopa-default"
$PY tune_foundation_model.py "${lopa[@]}" "${common[@]}" --per_gpu_train_batch_size 4 --log_dir "$d/lopa-auto"
$PY - "$d" <<'PYEOF'
import json, sys
def run(name):
    rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
    runtime = json.load(open(f"{sys.argv[1]}/{name}/config.json"))["runtime"]
    log = open(f"{sys.argv[1]}/{name}/train.log").read()
    return [r["loss"] for r in rows if "loss" in r], runtime, log, rows[-1].get("gpu_peak_mem_gib")
worst, failed = 0.0, []
for name in ("pt-default", "pt-auto", "pt-auto-accum", "lopa-default", "lopa-auto"):
    base = run(name.split("-")[0] + "-default")[0]
    losses, rt, log, held = run(name)
    if rt["cuda_graphs"] and "no compiled graph skipped its CUDA graph" not in log:
        failed.append(f"{name}: CUDA graphs skipped (train.log)")
    if "auto" in name and rt["device"].startswith("cuda") and rt["compile_mode"] != "reduce-overhead":
        failed.append(f"{name}: --compile_mode auto chose {rt['compile_mode']} on {rt['device']}")
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses, base)) if len(losses) == len(base) else float("inf")
    worst = max(worst, diff)
    print(f"trainer_graphs: {name}: {len(losses)} steps, compile_mode {rt['compile_mode']}, cuda_graphs "
          f"{rt['cuda_graphs']}, pad_to_multiple_of {rt['pad_to_multiple_of']}, largest relative loss difference "
          f"from its default-mode run {diff:.2e}; GPU memory held at most {held} GiB; losses "
          f"{[round(x, 4) for x in losses]}")
if worst > 0.02:
    failed.append(f"losses differ by {worst:.2e} (> 2 %)")
sys.exit("trainer_graphs: " + "; ".join(failed) if failed else 0)
PYEOF
