"""Score MBPP or CRUXEval predictions in the sandbox: pass@k, per-sample results and a summary beside the input.

    python evaluate_preds.py --task_name mbpp --path logging/run/mbxp_solutions_stage2.jsonl
    python evaluate_preds.py --task_name cruxeval_output_prediction --path logging/run/output.json --k 1,5
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from utils.cli import ArgumentParser, check_mbpp_split
from utils.errors import UserError, cli_entry, on_interrupt
from utils.evaluation import DEFAULT_TIMEOUT, TASK_NAMES, evaluate_file
from utils.sandbox import MODES, SandboxConfig
from utils.scoring_progress import progress_path


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--task_name", required=True, choices=TASK_NAMES, help="the task the predictions are for")
    p.add_argument("--path", required=True, help="MBPP: JSONL of {task_id, completion}; CRUXEval: JSON {id: [answer]}")
    p.add_argument("--problem_file", default=None,
                   help="MBPP: problems JSONL (default: the test split of --data_path when given, else "
                        "mbpp_test_problems.jsonl beside --path, else the test split); CRUXEval: the dataset JSONL")
    p.add_argument("--data_path", default=None,
                   help="the task's dataset JSONL (MBPP: its --mbpp_split test split is used)")
    p.add_argument("--mbpp_split", default="paper", choices=("paper", "standard"),
                   help="MBPP: the split the test tasks come from (paper: MBPP/488-974; standard: 11-510)")
    p.add_argument("--n_workers", type=int, default=None, help="parallel samples (default: the usable CPU count)")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"wall-clock seconds per sample (default: {DEFAULT_TIMEOUT['mbpp']:g} for MBPP, "
                        f"{DEFAULT_TIMEOUT['cruxeval_input_prediction']:g} for CRUXEval)")
    p.add_argument("--k", default="1,5,10", help="comma-separated k of pass@k (reported where every task has n >= k)")
    p.add_argument("--memory_mb", type=int, default=SandboxConfig.memory_mb, help="address-space limit per sample")
    p.add_argument("--sandbox_mode", default="auto", choices=MODES, help="auto picks the strongest mode that works")
    p.add_argument("--allow_missing", action="store_true", help="score only the tasks that have samples (a file that lacks some test tasks is refused "
                        "otherwise, unless a --limit generation wrote it: its generate_preds_config.json says so)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--reuse_finished", action="store_true",
                   help="take the results of a finished scoring of this file whose summary records the same "
                        "predictions, programs and settings instead of scoring it again (run_experiment.py passes it "
                        "when it redoes a cell); without it a finished file is scored afresh")
    args = p.parse_args(argv)
    try:
        args.k = tuple(int(k) for k in args.k.split(",") if k.strip())
    except ValueError:
        raise UserError(f"--k {args.k!r}: expected comma-separated integers such as 1,5,10") from None
    if not args.k or min(args.k) < 1:
        raise UserError("--k: every k must be a positive integer")
    if args.n_workers is not None and args.n_workers < 1:
        raise UserError("--n_workers must be at least 1")
    if args.timeout is not None and not 0 < args.timeout < math.inf:  # NaN and inf broke the CPU-time rlimit
        raise UserError(f"--timeout must be a positive finite number of seconds, got {args.timeout}")
    check_mbpp_split(args.task_name, args.mbpp_split)
    if args.memory_mb < 64:
        raise UserError("--memory_mb below 64 leaves no room for the interpreter; use at least 64")
    return args


@cli_entry
def main(argv=None) -> dict:
    args = parse_args(argv)
    # until scoring starts: then evaluate_file says how many samples it kept
    on_interrupt(f"rerun the same command: it goes on from the samples kept in {progress_path(args.path)}, if any")
    summary = evaluate_file(args.task_name, args.path, problem_file=args.problem_file, data_path=args.data_path,
                            n_workers=args.n_workers, timeout=args.timeout, k=args.k,
                            allow_missing=args.allow_missing, progress=not args.no_progress,
                            sandbox_config=SandboxConfig(memory_mb=args.memory_mb, mode=args.sandbox_mode),
                            mbpp_split=args.mbpp_split, reuse_finished=args.reuse_finished)
    counts = summary["counts"]
    sandbox = summary["sandbox"]
    print(f"sandbox mode: {sandbox['mode']}/{sandbox['start']} (network namespace: "
          f"{sandbox['network_namespace']}, unprivileged uid: {sandbox['unprivileged_uid']})")
    if sandbox["mode"] != "namespaces":
        # without the uid drop a program can also rewrite the caller's files and kill this evaluator
        user = "" if sandbox["unprivileged_uid"] else (f"; programs run as your user (uid {os.geteuid()}): they "
                                                      f"can read and change its files and stop this evaluation")
        print(f"warning: the sandbox is degraded (no namespaces: network and /tmp are not isolated{user}; see "
              f"docs/EVALUATION.md); modes that failed: {sandbox['modes_that_failed']}", file=sys.stderr)
    for key in (key for key in summary if key.startswith("pass@")):
        print(f"{key} = {100 * summary[key]:.2f}%")
    omitted = [f"pass@{k}" for k in args.k if f"pass@{k}" not in summary]
    if omitted:
        print(f"{', '.join(omitted)}: not reported (needs at least k samples per task; the fewest here: "
              f"{summary['samples_per_task']['min']})")
    speed, reused = f"{summary['samples_per_s']} samples/s", summary["reused_samples"]
    if reused:  # the time and speed are this run's, for the samples it ran
        speed = (f"{summary['n_samples'] - reused} run here, {reused} reused from an earlier run"
                 + (f"; {speed}" if summary["samples_per_s"] else ""))
    print(f"{summary['n_samples']} samples of {summary['n_tasks']} tasks: {counts['passed']} passed, "
          f"{counts['failed']} failed, {counts['timed out']} timed out in {summary['seconds']:.1f} s ({speed})")
    if counts["sandbox_errors"]:
        print(f"warning: {counts['sandbox_errors']} samples failed because of the sandbox, not the program "
              f"(reason 'sandbox error' in the results)", file=sys.stderr)
    print(f"results: {summary['results_path']}\nsummary: {summary['summary_path']}")
    return summary


if __name__ == "__main__":
    main()
