"""Tune a foundation model with a PEFT method (lora, pt, idpg, lopa) on MBPP or CRUXEval.

    python tune_foundation_model.py --peft_method lopa --task_name mbpp --model_type phi-2
    accelerate launch --config_file config_files/config_ds_zero_stage2_no_fp16.yaml tune_foundation_model.py ...

Arguments are checked before anything loads; see ``--help`` and docs/TRAINING.md.
"""
from __future__ import annotations

import sys

from utils.errors import cli_entry
from utils.train_args import parse_args


@cli_entry
def main(argv: list[str] | None = None):
    config = parse_args(argv, script="peft")
    from utils.training import train  # heavy imports only after the arguments passed

    result = train(config)
    if result.is_main_process:
        print(f"trained {result.global_step} steps; adapter: {result.final_dir}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
