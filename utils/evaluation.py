"""Score predictions by running them in the sandbox: program assembly, parallel runs, pass@k, result files.

Semantics follow the public harnesses (spec §7):

* MBPP (mxeval): the program is ``prompt + completion + "\\n" + test + "\\n" + "check(<entry_point>)"``;
  every task of the problem file must have samples (``allow_missing``, or a ``--limit`` generation's file, scores
  the ones present); default timeout 15 s.
* CRUXEval: the program is ``code + "\\nassert " + output + " == " + prediction``. In input mode a prediction
  without ``f(`` fails without running; in output mode one that contains ``f(<input>)`` fails (it would
  let the program compute the answer). Such predictions count as failures, so n is always the number of
  generations, as in the official CRUXEval script (the LOPA repository's copy drops them from n: a bias when
  n > 1). A file of test ids must have every test id, as MBPP's; one that mixes the splits is refused; default
  timeout 10 s.
* pass@k is the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` averaged over tasks, reported for each k that
  every task's n reaches.

Samples run in parallel with a tqdm progress bar: ``n_workers`` threads (default: the usable CPUs), each
driving its own worker slot of the sandbox (utils/sandbox.py). A sample whose sandbox failed (not the
program) counts as failed with a reason that starts with "sandbox error", counted in the summary.

Nothing is lost on a crash: each finished sample is appended to ``<stem>_results.partial.jsonl`` (``Progress``), and
the next run of the same command runs only the samples it lacks; the file is deleted once the results are written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pathlib
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from utils.data import (CRUXEVAL_SPLITS, dataset_hint, default_data_path, load_records, load_task_split, read_jsonl,
                        read_text_file)
from utils.errors import UserError, on_interrupt
from utils.fileio import atomic_write_text, check_writable_dir, naming_full_disk, parse_appended_lines
from utils.prediction_files import check_generated_for
from utils.sandbox import Sandbox, SandboxConfig

CRUX_TASKS = {"cruxeval_input_prediction": "input", "cruxeval_output_prediction": "output"}
TASK_NAMES = ("mbpp",) + tuple(CRUX_TASKS)
DEFAULT_TIMEOUT = {"mbpp": 15.0, "cruxeval_input_prediction": 10.0, "cruxeval_output_prediction": 10.0}
DEFAULT_K = (1, 5, 10)
MBPP_PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "test")
MBPP_PROBLEMS_FILE = "mbpp_test_problems.jsonl"
MBPP_PROBLEMS_HINT = (f"MBPP problems are JSONL with fields {', '.join(MBPP_PROBLEM_FIELDS)} (generate_preds.py "
                      f"writes {MBPP_PROBLEMS_FILE} beside the predictions): pass that as --problem_file, or the "
                      f"MBXP-format MBPP JSONL (mbpp_release_v1.jsonl) as --data_path")


@dataclasses.dataclass
class Sample:
    task_id: str
    index: int
    program: str | None
    """None: the prediction is malformed and fails without running (``reason`` says why)."""
    reason: str = ""
    prediction: str = ""


@dataclasses.dataclass
class SampleResult:
    task_id: str
    sample_index: int
    status: str
    reason: str
    seconds: float
    prediction: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "sample_index": self.sample_index, "status": self.status,
                "passed": self.passed, "reason": self.reason, "seconds": round(self.seconds, 4),
                "prediction": self.prediction}


# -- programs --------------------------------------------------------------------------------------------
def mbpp_program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def cruxeval_program(record: dict, prediction: str, mode: str) -> tuple[str | None, str]:
    """``(program, "")``, or ``(None, reason)`` for a prediction CRUXEval's rules reject without running."""
    if mode == "input" and "f(" not in prediction:
        return None, "malformed input prediction: no call f(...)"
    if mode == "output" and f"f({record['input']})" in prediction:
        return None, "malformed output prediction: it calls f on the input"
    return record["code"] + "\nassert " + record["output"] + " == " + prediction, ""


def mbpp_samples(solutions: list[dict], problems: dict[str, dict]) -> list[Sample]:
    counts: dict[str, int] = {}
    samples = []
    for sol in solutions:
        tid = sol["task_id"]
        index = counts[tid] = counts.get(tid, -1) + 1
        samples.append(Sample(tid, index, mbpp_program(problems[tid], sol["completion"]),
                              prediction=sol["completion"]))
    return samples


def cruxeval_samples(predictions: dict[str, list[str]], records: dict[str, dict], mode: str) -> list[Sample]:
    samples = []
    for rid, preds in predictions.items():
        for index, pred in enumerate(preds):
            program, reason = cruxeval_program(records[rid], pred, mode)
            samples.append(Sample(rid, index, program, reason, pred))
    return samples


# -- running and scoring ------------------------------------------------------------------------------------
def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def run_samples(samples: list[Sample], sandbox: Sandbox, n_workers: int | None = None, progress: bool = True,
                desc: str = "evaluating", reused: dict[int, SampleResult] | None = None,
                on_result=None) -> list[SampleResult]:
    """Run every sample (in parallel, results in input order); malformed samples fail without running. The samples
    at the indices of ``reused`` are not run (their results are taken from it); ``on_result(index, result)`` is
    called in this thread as each of the others finishes. On Ctrl-C the queued samples are dropped, the running
    ones stopped at once (``Sandbox.cancel``), and ``on_result`` still gets every sample that had finished."""

    def one(sample: Sample) -> SampleResult:
        if sample.program is None:
            return SampleResult(sample.task_id, sample.index, "failed", sample.reason, 0.0, sample.prediction)
        r = sandbox.run(sample.program)
        return SampleResult(sample.task_id, sample.index, r.status, r.reason, r.seconds, sample.prediction)

    results: list[SampleResult | None] = [None] * len(samples)
    for i, result in (reused or {}).items():
        results[i] = result
    futures = {}
    with ThreadPoolExecutor(max(1, n_workers or default_workers())) as pool, \
            tqdm(total=len(samples), initial=len(reused or {}), desc=desc, disable=not progress, unit="sample") as bar:
        try:
            futures = {pool.submit(one, s): i for i, s in enumerate(samples) if results[i] is None}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result is not None:
                    on_result(i, results[i])
                bar.update(1)
        except BaseException as exc:
            # Ctrl-C (or an error): drop the queued samples, or leaving the pool would still run them all, and stop
            # the running ones, or it would wait for each to end (up to --timeout)
            pool.shutdown(wait=False, cancel_futures=True)
            sandbox.cancel()
            if isinstance(exc, KeyboardInterrupt) and on_result is not None:
                for fut, i in futures.items():  # keep what finished before, and not yet collected
                    if results[i] is None and not fut.cancelled() and fut.exception() is None:
                        on_result(i, fut.result())
            raise
    return results  # type: ignore[return-value]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples with c passing."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(results: list[SampleResult], ks=DEFAULT_K) -> dict:
    """pass@k (fractions, for each k <= every task's n), per-status counts and sample counts."""
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r.passed)
    ns = [len(v) for v in per_task.values()]
    min_n = min(ns) if ns else 0
    scores = {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
              for k in sorted(set(ks)) if per_task and k <= min_n}
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timed out")}
    counts["sandbox_errors"] = sum(r.reason.startswith("sandbox error") for r in results)
    return {**scores, "n_tasks": len(per_task), "n_samples": len(results),
            "samples_per_task": {"min": min_n, "max": max(ns) if ns else 0}, "counts": counts}


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


def output_paths(path) -> tuple[pathlib.Path, pathlib.Path]:
    path = pathlib.Path(path)
    return path.with_name(path.stem + "_results.jsonl"), path.with_name(path.stem + "_summary.json")


def progress_path(path) -> pathlib.Path:
    """Where scoring keeps the samples finished so far (``Progress``): ``<stem>_results.partial.jsonl``."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + "_results.partial.jsonl")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def program_hash(sample: Sample) -> str:
    """What a sample's result depends on besides the run's settings: its program (or why it has none) and the
    prediction its result records. JSON escapes every non-ASCII character (lone surrogates too)."""
    return _sha256(json.dumps([sample.program, sample.reason, sample.prediction]).encode("ascii"))


class Progress:
    """``<stem>_results.partial.jsonl``: a header line (``fingerprint``: what the results depend on), then one line
    per finished sample, its ``_results.jsonl`` line plus ``program_sha256``. Each line is appended as its sample
    finishes, from the thread that collects the results, so a kill loses at most the line being written (a torn last
    line is ignored). A run whose header matches reuses the results of the same task id, sample index and program
    hash, except sandbox errors (the next run's sandbox may work); a file that does not match is replaced. ``remove``
    it once the results are written. The header is also the summary's ``fingerprint``: a finished scoring that
    records this run's can be reused the same way (``resume(finished=True)``)."""

    CHANGED = {"task_name": "it was scored as {old}, this run as {new}",
               "predictions_sha256": "the predictions file has changed",
               "programs_sha256": "the problems have changed (other programs)",
               "timeout_s": "its timeout was {old} s, this run's is {new} s"}

    def __init__(self, predictions: pathlib.Path, samples: list[Sample], task_name: str, **settings):
        """``settings``: the run's other settings the results depend on (timeout_s, memory_mb, sandbox_mode, ...)."""
        self.path, self.samples, self.predictions = progress_path(predictions), samples, predictions
        self.hashes = [program_hash(s) for s in samples]
        keys = [[s.task_id, s.index, h] for s, h in zip(samples, self.hashes)]
        self.fingerprint = {"scoring_progress": 1, "task_name": task_name,
                            "predictions_sha256": _sha256(predictions.read_bytes()),
                            "programs_sha256": _sha256(json.dumps(keys).encode("ascii")), **settings}
        self.kept = 0

    def resume(self, finished: bool = False) -> dict[int, SampleResult]:
        """The kept results of the samples (by index); says in one line what is reused, or why nothing is. The file
        is rewritten with them (a torn line dropped, sandbox errors left out), ready for appends. ``finished``: a
        finished scoring of the file (``_results.jsonl``) whose summary records this run's fingerprint is reused
        instead, all but its sandbox errors."""
        stored, why = self._read()
        done, why_not_done = self._read_finished() if finished else ({}, "")
        source = done or stored
        reused = {i: source[key] for i, (s, h) in enumerate(zip(self.samples, self.hashes))
                  if (key := (s.task_id, s.index, h)) in source}
        results = output_paths(self.predictions)[0]
        if done:
            print(f"reusing: {len(reused):,} of {len(self.samples):,} samples already scored with these predictions, "
                  f"programs and settings in {results}; delete it to score again", flush=True)
        elif reused:
            print(f"resuming: {len(reused):,} of {len(self.samples):,} samples already scored in {self.path}; "
                  f"delete it to score from scratch", flush=True)
        elif why_not_done:
            print(f"scoring again: {results} is of another scoring ({why_not_done})", flush=True)
        elif why:
            print(f"scoring from scratch: {self.path} is another run's ({why}); it is replaced", flush=True)
        lines = [self.fingerprint] + [{**reused[i].to_json(), "program_sha256": self.hashes[i]} for i in sorted(reused)]
        atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in lines))
        self.kept = len(reused)
        return reused

    def _read(self) -> tuple[dict, str]:
        """``({(task id, index, program hash): result}, "")``, or ``({}, why the file is of no use)``."""
        if not self.path.is_file():
            return {}, ""
        try:
            records = parse_appended_lines(self.path, self.path.read_bytes().splitlines(), dict, "")
            header = records[0] if records else {}
            if header != self.fingerprint:
                return {}, self._changed(header)
            stored = {}
            for r in records[1:]:
                result = _stored_result(r)
                if not result.reason.startswith("sandbox error"):
                    stored[result.task_id, result.sample_index, r["program_sha256"]] = result
            return stored, ""
        except (UserError, KeyError, TypeError, AttributeError):
            return {}, "it is not a file of scored samples"

    def _read_finished(self) -> tuple[dict, str]:
        """``({(task id, index, program hash): result}, "")`` from ``_results.jsonl`` when ``_summary.json`` records
        this run's fingerprint (the same predictions, programs and settings; the results are in sample order),
        without sandbox errors; else ``({}, why they are of no use)`` (no reason where there is no summary)."""
        results_path, summary_path = output_paths(self.predictions)
        if not summary_path.is_file():
            return {}, ""
        try:
            recorded = json.loads(summary_path.read_text(encoding="utf-8")).get("fingerprint")
            if recorded != self.fingerprint:
                return {}, self._changed(recorded) if isinstance(recorded, dict) else "it records no fingerprint"
            records = [json.loads(line) for line in results_path.read_text(encoding="utf-8").splitlines()]
            if len(records) != len(self.samples):
                return {}, f"{len(records):,} results for {len(self.samples):,} samples"
            stored = {}
            for sample, h, r in zip(self.samples, self.hashes, records):
                result = _stored_result(r)
                if (result.task_id, result.sample_index, result.prediction) != (sample.task_id, sample.index,
                                                                                sample.prediction):
                    return {}, f"its results differ from the samples at {sample.task_id}"
                if not result.reason.startswith("sandbox error"):
                    stored[sample.task_id, sample.index, h] = result
            return stored, ""
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not ours: score it
            return {}, "it is not a finished scoring of this version"

    def _changed(self, header: dict) -> str:
        if header.get("scoring_progress") != self.fingerprint["scoring_progress"]:
            return "it has no header line of this version"
        for key, new in self.fingerprint.items():
            if header.get(key) != new:
                return self.CHANGED.get(key, f"its --{key} was {{old}}, this run's is {{new}}").format(
                    old=header.get(key), new=new)
        return "its header has other fields"

    def append(self, index: int, result: SampleResult) -> None:
        """Keep the finished sample at ``index`` (``run_samples``' ``on_result``)."""
        line = json.dumps({**result.to_json(), "program_sha256": self.hashes[index]}) + "\n"
        fix = (lambda: f"the {self.kept:,} samples scored before are kept in it; free space there, then rerun the "
                       f"same command to go on from there")
        with naming_full_disk(self.path, fix), self.path.open("a", encoding="ascii") as fh:
            fh.write(line)
        self.kept += not result.reason.startswith("sandbox error")  # the next run redoes those (resume)

    def interrupt_hint(self) -> str:
        return (f"{self.kept:,} of {len(self.samples):,} samples are kept in {self.path}; rerun the same command to "
                f"go on from there")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _stored_result(record: dict) -> SampleResult:
    """A result read back from a results line (``SampleResult.to_json``)."""
    return SampleResult(record["task_id"], record["sample_index"], record["status"], record["reason"],
                        record["seconds"], record["prediction"])


@contextlib.contextmanager
def scoring_lock(path: pathlib.Path):
    """An exclusive lock on the predictions file while it is scored (other files, a stage 1 and a stage 2 say, can be
    scored at once): a second scoring of the same file would replace the first one's progress file, and each would
    lose the samples the other kept. The OS drops the lock when the process ends, however it ends."""
    with open(path, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{path}: another evaluate_preds.py is scoring this file; wait for it to finish (or stop "
                            f"it: a rerun goes on from the samples it kept)") from None
        yield


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
