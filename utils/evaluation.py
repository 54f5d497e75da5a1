"""Score a predictions file: read and check it and its problems, run its samples, write the result files.

Which files are scored, and how (spec §7; the programs and pass@k are utils/scoring.py's):

* MBPP: every task of the problem file must have samples (``allow_missing``, or a ``--limit`` generation's file,
  scores the ones present); default timeout 15 s.
* CRUXEval: a file of test ids must have every test id, as MBPP's; one that mixes the splits is refused; default
  timeout 10 s.

A run is resumable (utils/scoring_progress.py): an interrupted one's samples are kept, and the same command goes on
from them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import time

from utils.data import (CRUXEVAL_SPLITS, dataset_hint, default_data_path, load_records, load_task_split, read_jsonl,
                        read_text_file)
from utils.errors import UserError, on_interrupt
from utils.fileio import atomic_write_text, check_writable_dir
from utils.prediction_files import check_generated_for
from utils.sandbox import Sandbox, SandboxConfig
from utils.scoring import DEFAULT_K, cruxeval_samples, default_workers, mbpp_samples, run_samples, summarize
from utils.scoring_progress import Progress, output_paths, scoring_lock

CRUX_TASKS = {"cruxeval_input_prediction": "input", "cruxeval_output_prediction": "output"}
TASK_NAMES = ("mbpp",) + tuple(CRUX_TASKS)
DEFAULT_TIMEOUT = {"mbpp": 15.0, "cruxeval_input_prediction": 10.0, "cruxeval_output_prediction": 10.0}
MBPP_PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "test")
MBPP_PROBLEMS_FILE = "mbpp_test_problems.jsonl"
MBPP_PROBLEMS_HINT = (f"MBPP problems are JSONL with fields {', '.join(MBPP_PROBLEM_FIELDS)} (generate_preds.py "
                      f"writes {MBPP_PROBLEMS_FILE} beside the predictions): pass that as --problem_file, or the "
                      f"MBXP-format MBPP JSONL (mbpp_release_v1.jsonl) as --data_path")


# -- files -------------------------------------------------------------------------------------------------
MBPP_FORMAT_HINT = ("MBPP predictions are JSONL, one {task_id, completion} object per line (mbxp_solutions*.jsonl); "
                    "CRUXEval's JSON files go to --task_name cruxeval_*_prediction or postprocess_cruxeval_preds.py")
CRUXEVAL_FORMAT_HINT = ('CRUXEval predictions are one JSON object {"sample_412": [text, ...]} (output.json, '
                        "output_raw.json); MBPP's JSONL goes to --task_name mbpp or postprocess_mbpp_preds.py")


def _read_json(path: pathlib.Path):
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {CRUXEVAL_FORMAT_HINT}") from None


def read_cruxeval_predictions(path) -> dict[str, list[str]]:
    """``{"sample_412": [prediction, ...]}`` (a bare string is one prediction)."""
    path = pathlib.Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}; {CRUXEVAL_FORMAT_HINT}")
    out = {}
    for rid, preds in data.items():
        preds = [preds] if isinstance(preds, str) else preds
        if not isinstance(preds, list) or not all(isinstance(p, str) for p in preds):
            raise UserError(f"{path}: value of {rid!r} must be a list of strings")
        if not preds:  # scoring would drop the id and raise the score
            raise UserError(f"{path}: {rid!r} has no predictions (an empty list); give it at least one, or leave "
                            f"the id out")
        out[rid] = preds
    return out


def check_cruxeval_ids(path, predictions: dict, records: dict) -> None:
    unknown = sorted(predictions.keys() - records.keys())
    if unknown:
        raise UserError(f"{path}: {len(unknown)} ids are not in the CRUXEval data (first: {unknown[0]!r}); ids look "
                        f"like 'sample_412': check that this is a CRUXEval predictions file, and --data_path")


def missing_cruxeval_test_ids(path, predictions: dict, records: dict) -> list[str]:
    """The test-split ids (of ``records``) a test-split predictions file lacks; a file of train-split ids (scored
    on purpose) lacks none. Both splits in one file are refused: the score would be neither's."""
    lo, hi = CRUXEVAL_SPLITS["test"]
    test = {rid for rid in records if re.fullmatch(r"sample_\d+", rid) and lo <= int(rid[7:]) <= hi}
    inside, outside = predictions.keys() & test, sorted(predictions.keys() - test)
    if inside and outside:
        raise UserError(f"{path}: {len(outside)} ids from outside the test split (first: {outside[0]!r}) beside "
                        f"{len(inside)} test ids; score one split at a time")
    return [] if outside else sorted(test - inside, key=lambda rid: int(rid[7:]))


def _limited_generation(path, present: int, total: int) -> bool:
    """Whether ``path`` is a ``--limit`` generation's whole output: its generate_preds_config.json has a limit, and
    the file holds that many of the ``total`` tasks (a cut or mixed file does not pass for one)."""
    from utils.prediction_files import CONFIG_FILE

    try:
        limit = json.loads((pathlib.Path(path).parent / CONFIG_FILE).read_text(encoding="utf-8")).get("limit")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(limit, int) and present == min(limit, total)


def read_mbpp_solutions(path) -> list[dict]:
    solutions = read_jsonl(path, ("task_id", "completion"), MBPP_FORMAT_HINT)
    for i, sol in enumerate(solutions, 1):
        if not isinstance(sol["completion"], str):
            raise UserError(f"{path}: record {i} ({sol['task_id']}): field 'completion' must be a string")
    return solutions


def read_mbpp_solutions_and_problems(path, problem_file=None, data_path=None, mbpp_split="paper"):
    """``(solutions, problems)``; every solution's task id must be a known problem, and there is at least one (an
    empty file is refused: scored with --allow_missing it gave 0 samples of 0 tasks; post-processed, empty stages)."""
    solutions = read_mbpp_solutions(path)
    if not solutions:
        raise UserError(f"{path}: no predictions (an empty file); generate them first (generate_preds.py), or "
                        f"pass the file it wrote")
    problems = load_mbpp_problems(path, problem_file, data_path, mbpp_split)
    unknown = sorted({s["task_id"] for s in solutions} - problems.keys())
    if unknown:
        raise UserError(f"{path}: {len(unknown)} task ids are not in the problem set (first: {unknown[0]}); "
                        f"pass the matching --problem_file")
    return solutions, problems


def load_mbpp_problems(predictions_path, problem_file=None, data_path=None, mbpp_split="paper") -> dict[str, dict]:
    """The problem file if given, else ``mbpp_test_problems.jsonl`` beside the predictions, else the test split
    of ``data_path`` (default: ../shared/data when present, else the public source)."""
    sibling = pathlib.Path(predictions_path).with_name(MBPP_PROBLEMS_FILE)
    if problem_file is None and data_path is None and sibling.is_file():
        problem_file = sibling
    if problem_file is not None:
        records = read_jsonl(problem_file, MBPP_PROBLEM_FIELDS, MBPP_PROBLEMS_HINT)
    else:
        records = load_task_split("mbpp", "test", data_path or default_data_path("mbpp"), mbpp_split=mbpp_split)
    return {r["task_id"]: r for r in records}


def load_cruxeval_records(task_name, problem_file=None, data_path=None) -> dict[str, dict]:
    """Every CRUXEval row by id (predictions may come from either split): from ``problem_file`` or
    ``data_path``, else ../shared/data when present, else the public source."""
    path = problem_file or data_path or default_data_path(task_name)
    hint = dataset_hint(task_name)  # an MBPP file here said only "missing field 'id'"
    records = read_jsonl(path, ("id", "code", "input", "output"), hint) if path else load_records(task_name, None)
    return {r["id"]: r for r in records}


def evaluate_file(task_name: str, path, problem_file=None, data_path=None, n_workers: int | None = None,
                  timeout: float | None = None, k=DEFAULT_K, allow_missing: bool = False, progress: bool = True,
                  sandbox_config: SandboxConfig | None = None, mbpp_split: str = "paper",
                  reuse_finished: bool = False) -> dict:
    """Score a predictions file; write ``<stem>_results.jsonl`` and ``<stem>_summary.json`` beside it. An
    interrupted run's samples are kept in ``<stem>_results.partial.jsonl`` (``Progress``): the same call goes on
    from there. ``seconds`` and ``samples_per_s`` are this run's, for the samples it ran (not ``reused_samples``).
    ``reuse_finished``: take the results of a finished scoring whose summary's ``fingerprint`` is this run's instead
    of running the samples again (run_experiment redoing a cell); by default a finished file is scored afresh.

    MBPP: ``path`` is JSONL of ``{"task_id", "completion"}`` (several lines per task for n > 1). CRUXEval:
    ``path`` is JSON ``{id: [prediction, ...]}`` with predictions already extracted. Returns the summary.
    """
    if task_name not in TASK_NAMES:
        raise UserError(f"unknown task {task_name!r}; choose one of: {', '.join(TASK_NAMES)}")
    path = pathlib.Path(path)
    check_generated_for(path, task_name, lambda recorded: f"score it with --task_name {recorded}")
    timeout = timeout or DEFAULT_TIMEOUT[task_name]
    config = sandbox_config or SandboxConfig()
    # the programs must not read the other samples or any task's tests
    read = (path, problem_file, data_path or (None if problem_file else default_data_path(task_name)))
    shown = [pathlib.Path(f) for f in read if f and pathlib.Path(f).exists()]
    config = dataclasses.replace(config, timeout=timeout,
                                 hide=(*config.hide, *sorted({str(f.resolve().parent) for f in shown})))
    if task_name == "mbpp":
        solutions, problems = read_mbpp_solutions_and_problems(path, problem_file, data_path, mbpp_split)
        missing = sorted(problems.keys() - {s["task_id"] for s in solutions})
        present = len(problems) - len(missing)
        if missing and not allow_missing and not _limited_generation(path, present, len(problems)):
            raise UserError(f"{path}: no samples for {len(missing)} of {len(problems)} problems (first: "
                            f"{missing[0]}); pass --allow_missing to score only the tasks present")
        samples = mbpp_samples(solutions, problems)
    else:
        mode = CRUX_TASKS[task_name]
        if path.name.endswith("_raw.json"):
            from utils.postprocess import cruxeval_answers_path

            raise UserError(f"{path}: raw completions, not answers; extract them first (python "
                            f"postprocess_cruxeval_preds.py --path {path} --mode {mode}) and score the "
                            f"{cruxeval_answers_path(path).name} it writes")
        predictions = read_cruxeval_predictions(path)
        if not predictions:
            raise UserError(f"{path}: no predictions; {CRUXEVAL_FORMAT_HINT}")
        records = load_cruxeval_records(task_name, problem_file, data_path)
        check_cruxeval_ids(path, predictions, records)
        missing = missing_cruxeval_test_ids(path, predictions, records)
        if missing and not allow_missing and not _limited_generation(path, len(predictions),
                                                                     len(missing) + len(predictions)):
            raise UserError(f"{path}: no predictions for {len(missing)} of the test split's "
                            f"{len(missing) + len(predictions)} ids (first: {missing[0]}); pass --allow_missing to "
                            f"score only the ids present")
        samples = cruxeval_samples(predictions, records, CRUX_TASKS[task_name])
    check_writable_dir(path.parent, "--path")  # the results go beside it: fail now, not after the sandbox ran
    workers = max(1, n_workers or default_workers())
    start = time.monotonic()
    # the lock is held until the outputs are written and the progress file is gone: a second scorer let in before
    # would have its new progress file deleted, or the first one's outputs written under it
    with scoring_lock(path):
        with Sandbox(config) as sandbox:
            kept = Progress(path, samples, task_name=task_name, timeout_s=float(timeout), memory_mb=config.memory_mb,
                            sandbox_mode=sandbox.features["mode"], mbpp_split=mbpp_split)  # auto's choice
            reused = kept.resume(finished=reuse_finished)
            on_interrupt(kept.interrupt_hint)
            results = run_samples(samples, sandbox, workers, progress, desc=task_name, reused=reused,
                                  on_result=kept.append)
        seconds, ran = time.monotonic() - start, len(results) - len(reused)  # this run's time, for its samples
        summary = {"task_name": task_name, "predictions": str(path), **summarize(results, k),
                   "tasks_without_samples": len(missing), "timeout_s": timeout, "n_workers": workers,
                   "seconds": round(seconds, 3), "samples_per_s": round(ran / seconds, 2) if seconds and ran else None,
                   "reused_samples": len(reused), "sandbox": sandbox.features, "fingerprint": kept.fingerprint}
        results_path, summary_path = output_paths(path)
        summary_path.unlink(missing_ok=True)  # a kill before the new one is written: no fingerprint for old results
        atomic_write_text(results_path, "".join(json.dumps(r.to_json()) + "\n" for r in results))
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        kept.remove()
    summary["results_path"], summary["summary_path"] = str(results_path), str(summary_path)
    return summary
