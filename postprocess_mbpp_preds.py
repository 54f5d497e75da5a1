"""MBPP post-processing (spec §6.5): write <stem>_stage1.jsonl and <stem>_stage2.jsonl beside the predictions.

    python postprocess_mbpp_preds.py --path logging/run/mbxp_solutions.jsonl

Stage 1 cuts each completion at the earliest stop string and drops BOS/EOS strings; stage 2 keeps the
function body and trims its returns to complete expressions. Stage 2 needs each task's prompt (for its indent
unit): from --problem_file, else the test split of --data_path when given, else mbpp_test_problems.jsonl
beside --path, else the test split of ../shared/data. Score each file with evaluate_preds.py.
"""
from __future__ import annotations

import argparse

from utils.cli import ArgumentParser
from utils.errors import cli_entry
from utils.postprocess import postprocess_mbpp_file


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--path", required=True, help="JSONL of {task_id, completion, ...}")
    p.add_argument("--problem_file", default=None, help="problems JSONL with task_id and prompt")
    p.add_argument("--data_path", default=None, help="the MBPP dataset JSONL (its test split is used)")
    p.add_argument("--mbpp_split", default="paper", choices=("paper", "standard"),
                   help="the split the prompts come from when --data_path is read (paper: MBPP/488-974; standard: "
                        "11-510)")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> tuple[str, str]:
    args = parse_args(argv)
    stage1, stage2 = postprocess_mbpp_file(args.path, args.problem_file, args.data_path, args.mbpp_split)
    print(f"stage 1: {stage1}\nstage 2: {stage2}")
    return stage1, stage2


if __name__ == "__main__":
    main()
