"""Full fine-tuning baseline: every weight trains; ``final/`` is a Hugging Face model directory.

    deepspeed tune_fft_baseline.py --path_to_ds_config config_files/zero_stage3_config.json --fp16 True \
        --gradient_accumulation_steps 2
    python tune_fft_baseline.py --task_name mbpp --model_type deepseek-coder-1.3b-base --mixed_precision bf16

Generation loads the result with ``generate_preds.py --load_base_from_path <log_dir>/final``. See ``--help``
and docs/TRAINING.md.
"""
from __future__ import annotations

import sys

from utils.errors import cli_entry
from utils.train_args import parse_args


@cli_entry
def main(argv: list[str] | None = None):
    config = parse_args(argv, script="fft")
    from utils.training import train  # heavy imports only after the arguments passed

    result = train(config)
    if result.is_main_process:
        print(f"trained {result.global_step} steps; model: {result.final_dir}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
