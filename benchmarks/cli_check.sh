#!/usr/bin/env bash
# The README's tiny pipeline through the real CLIs, on whatever device torch picks (gpu_run.sh's cli_tiny section):
# train LOPA (bf16 autocast, --compile auto on a GPU), generate 16 MBPP prompts in bf16 with fast decoding on and
# off, with the project's own decoding loop (--decode_loop own) and with the default (auto: the own loop on a GPU),
# compare them, post-process and evaluate. No figures; it fails at the first command that fails.
#   bash benchmarks/cli_check.sh OUT_DIR MBPP_JSONL
set -eu
d=$1 data=$2
PY=${PYTHON:-python3}
common=(--task_name mbpp --model_type tiny-phi-2 --data_path "$data")
$PY tune_foundation_model.py --peft_method lopa "${common[@]}" --enc_model_type tiny-roberta --max_train_steps 6 \
  --limit_train_examples 12 --compile auto --log_dir "$d/train"
for variant in "on hf" "off hf" "on own" "auto auto"; do
  set -- $variant
  $PY generate_preds.py "${common[@]}" --load_adapter_from "$d/train/final" --limit 16 --max_new_tokens 32 \
    --dtype bf16 --batch_size 16 --fast_decoding "$1" --decode_loop "$2" --log_dir "$d/preds-$1-$2"
done
# bf16 on random weights leaves near ties, so a few different predictions are expected; bench_generate's
# generate-check line says whether its divergences are near ties (divergences_not_near_ties, 0 when they all are).
$PY - "$d" <<'PYEOF'
import json, sys
rows = {f: [json.loads(line)["raw"] for line in open(f"{sys.argv[1]}/preds-{f}/mbxp_raw.jsonl")]
        for f in ("on-hf", "off-hf", "on-own", "auto-auto")}
for a, b in (("on-hf", "off-hf"), ("on-own", "off-hf"), ("on-own", "on-hf"), ("auto-auto", "on-own")):
    same = sum(x == y for x, y in zip(rows[a], rows[b]))
    print(f"cli_tiny: decoding {a} vs {b} (bf16): {same} of {len(rows[a])} predictions identical")
PYEOF
$PY postprocess_mbpp_preds.py --path "$d/preds-on-hf/mbxp_solutions.jsonl"
$PY evaluate_preds.py --task_name mbpp --path "$d/preds-on-hf/mbxp_solutions_stage1.jsonl"
