"""Running run_experiment's cells (utils/experiment_plan.py plans them): each is trained, generated,
post-processed and evaluated by the project's own scripts, in this process, and its result is cached.

A cell whose stored result has the cell's hash is skipped. After a code change, stored cells are kept (the run says
so when their commit differs) until --force. Each stored result records the commands, the seed and the git commit
that produced it. A cell that fails or is interrupted leaves no result.json, so the next run redoes it; its output
is in ``<cell>/cell.log``; a result.json the table cannot show (cut short, edited by hand) counts as none, and a
run redoes that cell. What its training already did is kept when the training settings are unchanged (whatever
changed in generation or evaluation): a finished training (``train/final``) is not redone, and an interrupted one
continues from its last checkpoint (presets that train for long save one every epoch).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import traceback

from utils.errors import UserError
from utils.experiment_plan import Cell
from utils.fileio import atomic_write_text, naming_full_disk

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD, with ``-dirty`` when tracked files differ from it; outside a checkout (a Docker image has no .git),
    the LOPA_GIT_COMMIT the image was built with; else ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LOPA_GIT_COMMIT") or "unknown"


def _script_main(script: str):
    import importlib

    return importlib.import_module(script.removesuffix(".py")).main


MODEL_STAGES = ("tune_foundation_model.py", "tune_fft_baseline.py", "generate_preds.py")
"""The stages that build a model (and may compile it); the others read and write files."""


def _run_stage(script: str, argv: list[str]):
    """A stage's ``main`` in this process, as if in a process of its own: accelerate's process-wide state, which
    fixes the mixed precision at the first ``Accelerator()`` (a bf16 training after a generation stage failed with
    "AcceleratorState has already been initialized"), is reset around it, and its memory is freed after it. So are
    torch.compile's caches: every transformers decoder layer runs one wrapper's code, whose compiled entries torch
    caps at 8 per process, so without it the fifth or so cell trained its layers eager (a warning, nothing else).
    Only the stages that build a model are released after: a full collection costs ~0.3 s in a process that has
    imported torch and transformers, twice the smoke preset's post-processing and evaluation time."""
    from utils.fast_paths import release_compiled
    from utils.train_setup import reset_accelerate_state

    reset_accelerate_state()
    try:
        return _script_main(script)(argv)
    finally:
        reset_accelerate_state()
        if script in MODEL_STAGES:
            release_compiled()



class CellFailed(Exception):
    """A stage of a cell raised or exited non-zero; the cell has no result.json, so the next run redoes it."""

    def __init__(self, cell: Cell, script: str, argv: list[str], reason: str):
        self.cell, self.script, self.reason = cell, script, reason
        self.command = " ".join(["python", script] + argv)
        self.log = cell.directory / "cell.log"
        super().__init__(f"{cell.key}: {script} failed: {reason}")


class _Tee(io.TextIOBase):
    """Writes to the console and to a cell's log; once the log is closed (a logging handler may outlive the
    cell), to the console only."""

    def __init__(self, stream, log):
        self.stream, self.log, self.last_line = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        if text.strip():
            self.last_line = text.strip().splitlines()[-1]
        if not self.log.closed:
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if not self.log.closed:
            self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):  # tqdm picks its bar characters from it
        return getattr(self.stream, "encoding", None)


ATTEMPT_FILE = "attempt.json"
"""Written when a cell starts: the training hash its ``train/`` directory belongs to, the commits that trained it,
and the cell's hash, which lets a rerun resume a generation the attempt left unfinished (``_prepare``)."""


def _previous_attempt(cell: Cell) -> dict:
    try:
        previous = json.loads((cell.directory / ATTEMPT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


def planned_training(cell: Cell, previous: dict | None = None) -> str:
    """What running ``cell`` (without ``--force``) does about its training: ``"reused"`` (an earlier attempt with
    the same training settings finished it), ``"resumed"`` (it left a checkpoint), ``"fresh"``, or ``"none"`` (an
    untuned cell). ``previous``: the cell's attempt.json (read when not given)."""
    train_hash = cell.training_hash()
    if train_hash is None:
        return "none"
    previous = _previous_attempt(cell) if previous is None else previous
    if previous.get("training_hash") != train_hash:
        return "fresh"
    from utils.checkpoint import has_resumable_checkpoint

    train_dir = cell.directory / "train"
    if (train_dir / "final").is_dir():
        return "reused"
    return "resumed" if has_resumable_checkpoint(train_dir) else "fresh"


def replaced_results(cell: Cell, training: str | None = None) -> str | None:
    """What running ``cell`` throws away of a stored result of other settings (one cell directory holds one set):
    a phrase for the plan and the run's log, or None when there is no such result. ``training``: the cell's
    ``planned_training`` (found when not given)."""
    path = cell.directory / "result.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("config_hash") == cell.config_hash():
        return None
    score = f", pass@1 {100 * old['pass@1']:.2f}" if isinstance(old.get("pass@1"), (int, float)) else ""
    training = {"reused": "; its training is reused", "resumed": "; its training is resumed",
                "fresh": "; its training (other settings) is deleted", "none": ""}[training or planned_training(cell)]
    if training.endswith("deleted") and not (cell.directory / "train").exists():
        training = ""
    return f"replaces its stored result of other settings{score}{training}"


def _prepare(cell: Cell, fresh: bool) -> tuple[list[tuple[str, list[str]]], str, list[str]]:
    """Clear the cell's directory for a run and return ``(commands to run, training, training commits)``.
    ``training`` is ``"reused"`` when an earlier attempt with the same training settings finished its training
    (that stage is skipped; the commits are those the attempt recorded), ``"resumed"`` when it left a checkpoint
    (the stage gets ``--resume_from``; the earlier attempt's commits, then this one), else ``"fresh"`` (this
    commit). No commit for a cell without training; "unrecorded" for an attempt from before they were kept."""
    commands = list(cell.commands)
    train_dir = cell.directory / "train"
    train_hash = cell.training_hash()
    previous = _previous_attempt(cell)
    training = "fresh" if fresh else planned_training(cell, previous).replace("none", "fresh")  # as recorded before
    training_commits = [git_commit()] if train_hash is not None else []
    earlier = recorded_training_commits(previous)
    if training == "reused":
        commands = commands[1:]
        training_commits = earlier  # the code that trained the weights
    elif training == "resumed":
        script, argv = commands[0]
        commands[0] = (script, argv + ["--resume_from", str(train_dir)])
        training_commits = list(dict.fromkeys(earlier + training_commits))  # its steps came from both
    from utils.prediction_files import CONFIG_FILE as GEN_CONFIG_FILE

    gen_dir = cell.directory / "gen"
    # an attempt's generation, finished or killed part-way, of the very same commands up to generation on the
    # training it will use: go on from its batches (a change of the scoring settings alone regenerates nothing)
    same_generation = (previous.get("generation_hash") == cell.generation_hash()
                       or previous.get("config_hash") == cell.config_hash())  # an attempt.json of before the field
    resume_gen = (same_generation and not fresh and (train_hash is None or training == "reused")
                  and (gen_dir / GEN_CONFIG_FILE).is_file())
    if resume_gen:  # and a scoring the attempt finished is reused when its predictions and settings are the same
        extra = {"generate_preds.py": ["--resume"], "evaluate_preds.py": ["--reuse_finished"]}
        commands = [(script, argv + extra.get(script, [])) for script, argv in commands]
    if cell.directory.exists():
        (cell.directory / "result.json").unlink(missing_ok=True)  # first: a kill mid-clean-up must not leave it
        for child in cell.directory.iterdir():
            # attempt.json is replaced below, atomically: deleted first, a kill here would make the next run
            # take a finished training for another one and delete it
            if ((child == train_dir and training != "fresh") or (child == gen_dir and resume_gen)
                    or child.name in ("cell.log", ".lock", ATTEMPT_FILE)):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    cell.directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cell.directory / ATTEMPT_FILE, json.dumps({
        "training_hash": train_hash, "training_commits": training_commits, "config_hash": cell.config_hash(),
        "generation_hash": cell.generation_hash()}) + "\n")
    return commands, training, training_commits


def recorded_training_commits(record: dict) -> list[str]:
    """The commits an attempt.json or result.json says trained the cell: ``training_commits``, or the single
    ``training_commit`` records of an earlier version held; ``["unrecorded"]`` when neither is there."""
    commits = record.get("training_commits")
    if isinstance(commits, list) and commits:
        return [str(c) for c in commits]
    single = record.get("training_commit")
    return [single] if isinstance(single, str) and single else ["unrecorded"]


def run_cell(cell: Cell, seed: int, fresh: bool = False) -> dict:
    """Run every stage of a cell in this process (through each script's ``main``), its output also appended to
    ``<cell>/cell.log``; return its result record. An earlier attempt's training is reused or resumed unless
    ``fresh`` (see ``_prepare``). Raises CellFailed naming the stage; KeyboardInterrupt passes through. Either way
    no result.json is written."""
    commands, training, training_commits = _prepare(cell, fresh)
    start = time.perf_counter()
    summaries = []
    with naming_full_disk(cell.directory / "cell.log", "the cell has no result.json, so the next run redoes it: free "
                                                       "space, then rerun"), \
            open(cell.directory / "cell.log", "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(_Tee(sys.stdout, log)), contextlib.redirect_stderr(_Tee(sys.stderr, log)) as err:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        print(f"=== attempt started {stamp}; training: {training}", file=log, flush=True)
        for script, argv in commands:
            print(f"$ python {script} {' '.join(argv)}", file=log, flush=True)
            try:
                value = _run_stage(script, argv)
            except SystemExit as exc:  # cli_entry turns a UserError into exit 2, argparse too
                if exc.code in (0, None):
                    continue
                raise CellFailed(cell, script, argv, f"exit status {exc.code}: {err.last_line}") from None
            except Exception as exc:  # one cell's crash (OOM, a bug) must not lose the others
                traceback.print_exc()
                raise CellFailed(cell, script, argv, f"{type(exc).__name__}: {exc}") from exc
            if script == "evaluate_preds.py":
                summaries.append(value)
    main_summary = summaries[0]
    if "pass@1" not in main_summary:
        scored = next(argv for script, argv in cell.commands if script == "evaluate_preds.py")
        raise CellFailed(cell, "evaluate_preds.py", scored, "its summary has no pass@1 (--k without 1)")
    result = {
        "model": cell.model, "task": cell.task, "method": cell.method, "pass@1": main_summary["pass@1"],
        "n_tasks": main_summary["n_tasks"], "samples_per_task": main_summary.get("samples_per_task"),
        "scored_file": pathlib.Path(main_summary["results_path"]).name,
        "commands": [" ".join(["python", script] + argv) for script, argv in cell.commands],
        "seed": seed, "git_commit": git_commit(), "config_hash": cell.config_hash(), "training": training,
        "training_commits": training_commits, "data_file": cell.data_path, "data_sha256": cell.data_digest,
        "seconds": round(time.perf_counter() - start, 1),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if len(summaries) > 1:
        result["mbpp_stage2_pass@1"] = summaries[1]["pass@1"]
    result.update(training_cost(cell.directory / "train"))
    atomic_write_text(cell.directory / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def training_cost(train_dir: pathlib.Path) -> dict:
    """What a cell's training cost, from its own files (nothing for a cell without training): ``trainable_params``
    (config.json's runtime), ``train_seconds`` (metrics.jsonl's last ``elapsed``: the steps, checkpoints included,
    across a resumed run's attempts) and ``train_gpu_peak_gib`` (the largest ``gpu_peak_mem_gib``: GPU runs only;
    each attempt of a resumed training counts its own peak, so the largest is the run's)."""
    from utils.train_logging import METRICS_FILE, read_metrics

    try:
        runtime = json.loads((train_dir / "config.json").read_text(encoding="utf-8"))["runtime"]
        records = read_metrics(train_dir / METRICS_FILE)
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return {}
    last = records[-1] if records else {}
    peaks = [r["gpu_peak_mem_gib"] for r in records if r.get("gpu_peak_mem_gib") is not None]
    return {"trainable_params": runtime.get("trainable_params"), "train_seconds": last.get("elapsed"),
            "train_gpu_peak_gib": max(peaks, default=None)}


def stored_result(cell: Cell, warn: bool = True) -> dict | None:
    """The cell's result.json when it holds a result of the cell's settings (its hash), else None. A file the table
    cannot show (cut short, edited by hand: ``_result_problem``) counts as none, so a run that selects the cell redoes
    it, keeping a finished training and generation of the same settings; ``warn``: say so on stderr, naming it."""
    path = cell.directory / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        problem = _result_problem(result)
    except (OSError, ValueError) as exc:
        result, problem = None, f"unreadable ({exc})"
    if problem is not None:
        if warn:
            print(f"warning: {path}: {problem}; it counts as no result (a run that selects the cell redoes it)",
                  file=sys.stderr, flush=True)
        return None
    return result if result.get("config_hash") == cell.config_hash() else None


def _result_problem(result) -> str | None:
    """Why a stored result cannot be shown (None when it can): the fields the progress lines and results.md read,
    of the types ``run_cell`` writes."""
    if not isinstance(result, dict):
        return f"holds a JSON {type(result).__name__}, not a result object"

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def wrong(field: str, what: str) -> str:
        return f"{field} is {result[field]!r}, not {what}" if field in result else f"{field} ({what}) is missing"

    for field in ("pass@1", "mbpp_stage2_pass@1"):
        value = result.get(field)
        if (field == "pass@1" or value is not None) and not (number(value) and 0 <= value <= 1):
            return wrong(field, "a fraction from 0 to 1")
    for field, kind, what in (("n_tasks", int, "a whole number"), ("seed", int, "a whole number"),
                              ("git_commit", str, "text"), ("finished", str, "text"), ("commands", list, "a list")):
        if not isinstance(result.get(field), kind) or isinstance(result.get(field), bool):
            return wrong(field, what)
    per_task = result.get("samples_per_task")  # {"min", "max"}; absent from results before it was recorded
    if per_task is not None and not (isinstance(per_task, dict) and all(
            isinstance(per_task.get(k), int) and not isinstance(per_task.get(k), bool) for k in ("min", "max"))):
        return wrong("samples_per_task", "the fewest and most samples of a task: {\"min\": n, \"max\": n}")
    for field in ("seconds", "trainable_params", "train_seconds", "train_gpu_peak_gib"):
        if not (number(result.get(field)) or (field != "seconds" and result.get(field) is None)):
            return wrong(field, "a number")
    return None
