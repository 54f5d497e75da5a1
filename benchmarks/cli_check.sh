#!/usr/bin/env bash
# The README's tiny pipeline through the real CLIs, on whatever device torch picks (gpu_run.sh's cli_tiny section):
# train LOPA (bf16 autocast, --compile auto on a GPU), generate 16 MBPP prompts in bf16 with fast decoding on and
# off, compare the two, post-process and evaluate. No figures; it fails at the first command that fails.
#   bash benchmarks/cli_check.sh OUT_DIR MBPP_JSONL
set -eu
d=$1 data=$2
PY=${PYTHON:-python3}
common=(--task_name mbpp --model_type tiny-phi-2 --data_path "$data")
$PY tune_foundation_model.py --peft_method lopa "${common[@]}" --enc_model_type tiny-roberta --max_train_steps 6 \
  --limit_train_examples 12 --compile auto --log_dir "$d/train"
for fast in on off; do
  $PY generate_preds.py "${common[@]}" --load_adapter_from "$d/train/final" --limit 16 --max_new_tokens 32 \
    --dtype bf16 --batch_size 16 --fast_decoding "$fast" --log_dir "$d/preds-$fast"
done
# bf16 on random weights leaves near ties, so a few different predictions are expected; bench_generate's
# generate-check line says whether its divergences are near ties (divergences_not_near_ties, 0 when they all are).
$PY - "$d" <<'PYEOF'
import json, sys
rows = {f: [json.loads(line)["raw"] for line in open(f"{sys.argv[1]}/preds-{f}/mbxp_raw.jsonl")] for f in ("on", "off")}
same = sum(a == b for a, b in zip(rows["on"], rows["off"]))
print(f"cli_tiny: fast vs plain decoding (bf16): {same} of {len(rows['on'])} predictions identical")
PYEOF
$PY postprocess_mbpp_preds.py --path "$d/preds-on/mbxp_solutions.jsonl"
$PY evaluate_preds.py --task_name mbpp --path "$d/preds-on/mbxp_solutions_stage1.jsonl"
