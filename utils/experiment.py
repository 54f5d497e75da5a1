"""The pipeline behind run_experiment.py: a grid of cells (model × task × method), each trained, generated,
post-processed and evaluated by the project's own scripts, with results cached per cell.

A cell's identity is a hash of its commands' arguments and its data file's content; a cell whose stored result has
the same hash is skipped, so changing one hyperparameter redoes only the cells it reaches. The code is NOT part of
the hash: after a code change, stored cells are kept (the run says so when their commit differs) until --force.
Each stored result records the commands, the seed and the git commit that produced it. A cell that fails or is
interrupted leaves no result.json, so the next run redoes it; its output is in ``<cell>/cell.log``. What its training
already did is kept when the training settings are unchanged (whatever changed in generation or evaluation): a
finished training (``train/final``) is not redone, and an interrupted one continues from its last checkpoint
(presets that train for long save one every epoch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import datetime
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import traceback

from utils.data import default_data_path, load_task_split
from utils.errors import UserError
from utils.fileio import atomic_write_text, naming_full_disk
from utils.presets import Preset
from utils.registry import METHOD_FLAGS

ROW_NAMES = {"none": "None", "fft": "FFT", "lora": "LoRA", "pt": "PT", "idpg": "IDPG", "lopa": "LOPA"}
COLUMN_NAMES = {"cruxeval_input_prediction": "CruxEval-I", "cruxeval_output_prediction": "CruxEval-O",
                "mbpp": "MBPP"}
PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flags(values: dict, *, keep_false: bool | frozenset[str] = False) -> list[str]:
    """``keep_false`` (True, or the keys it holds): False becomes ``--key False`` (training's switches accept a
    value, and the fast paths default to True, so leaving the flag out would keep them on); elsewhere False flags
    are left out."""
    out = []
    for key, value in values.items():
        keep = keep_false if isinstance(keep_false, bool) else key in keep_false
        if value is None or (value is False and not keep):
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(str(value))
    return out


@dataclasses.dataclass
class Cell:
    model: str
    task: str
    method: str
    directory: pathlib.Path
    data_path: str | None
    commands: list[tuple[str, list[str]]]
    """(script, argv) in order; ``{TRAIN}`` / ``{GEN}`` are this cell's stage folders."""

    @property
    def key(self) -> str:
        return f"{self.model}/{self.task}/{self.method}"

    def config_hash(self) -> str:
        return self._digest(self.commands)

    def training_hash(self) -> str | None:
        """The training stage's own hash (None without one): a cell whose generation or evaluation settings change
        keeps its training."""
        trains = bool(self.commands) and self.commands[0][0] != "generate_preds.py"
        return self._digest(self.commands[:1]) if trains else None

    def generation_hash(self) -> str:
        """The hash of the stages up to generation (the training, if any, and generate_preds.py): a cell whose
        post-processing or evaluation settings change keeps its predictions."""
        scripts = [script for script, _ in self.commands]
        last = scripts.index("generate_preds.py") + 1 if "generate_preds.py" in scripts else len(scripts)
        return self._digest(self.commands[:last])

    @functools.cached_property
    def data_digest(self) -> str | None:
        """The data file's content hash, read once per cell (its config and training hashes both use it)."""
        return hashlib.sha256(pathlib.Path(self.data_path).read_bytes()).hexdigest() if self.data_path else None

    def _digest(self, commands) -> str:
        payload = {"commands": [(s, _identity_args(argv, self.directory)) for s, argv in commands],
                   "data": self.data_digest}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


NOT_IN_HASH = ("--keep_checkpoints",)
"""Flags (with their value) that leave a cell's result as it is: what happens to checkpoints once final/ exists."""


def _identity_args(argv: list[str], directory: pathlib.Path) -> list[str]:
    """The arguments a cell's hash covers: not its own paths, not ``NOT_IN_HASH``."""
    out, skip = [], False
    for arg in argv:
        if skip and not arg.startswith("--"):  # the value of a NOT_IN_HASH flag
            skip = False
            continue
        skip = arg in NOT_IN_HASH
        if not skip and str(directory) not in arg:
            out.append(arg)
    return out


def plan_cells(preset: Preset, out_dir: pathlib.Path) -> list[Cell]:
    cells = []
    for model in preset.models:
        for task in preset.tasks:
            family = "mbpp" if task == "mbpp" else "cruxeval"
            data_path = preset.data.get(family) or default_data_path(task)
            for method in preset.methods:
                directory = out_dir / "cells" / model / task / method
                cells.append(Cell(model, task, method, directory, data_path,
                                  _commands(preset, model, task, method, directory, data_path)))
    return cells


def _commands(preset: Preset, model: str, task: str, method: str, directory: pathlib.Path,
              data_path: str | None) -> list[tuple[str, list[str]]]:
    train_dir, gen_dir = directory / "train", directory / "gen"
    base = ["--task_name", task, "--model_type", model, "--seed", str(preset.seed)]
    if data_path:
        base += ["--data_path", data_path]
    commands = []
    if method != "none":
        # a flag another method reads stays out of this cell's commands, hence out of its hash
        train = {k: v for k, v in preset.train.items() if method in METHOD_FLAGS.get(k, (method,))}
        if method in ("idpg", "lopa"):
            train.setdefault("enc_model_type", preset.encoder)  # --set enc_model_type=... wins
        train.update(preset.per_method.get(method, {}))
        train.update(preset.per_task.get(task, {}).get(method, {}))
        if task != "mbpp":  # CRUXEval has one split: the flag would be refused, and --set mbpp_split redo its cells
            train.pop("mbpp_split", None)
        argv = (["--peft_method", method] if method != "fft" else []) + base + _flags(train, keep_false=True)
        commands.append(("tune_fft_baseline.py" if method == "fft" else "tune_foundation_model.py",
                         argv + ["--log_dir", str(train_dir)]))
    gen_flags = {k: v for k, v in preset.gen.items() if method in METHOD_FLAGS.get(k, (method,))
                 and (k != "mbpp_split" or task == "mbpp")}
    gen = (base + ["--peft_method", method] + _flags(gen_flags, keep_false=_valued_switches("generate_preds.py"))
           + ["--log_dir", str(gen_dir)])
    if method == "fft":
        gen += ["--load_base_from_path", str(train_dir / "final")]
    elif method != "none":
        gen += ["--load_adapter_from", str(train_dir / "final")]
    commands.append(("generate_preds.py", gen))
    evaluate = ["--task_name", task] + _flags(preset.eval)
    if task == "mbpp":
        commands.append(("postprocess_mbpp_preds.py", ["--path", str(gen_dir / "mbxp_solutions.jsonl")]))
        for stage in ("stage1", "stage2"):
            commands.append(("evaluate_preds.py", evaluate + ["--path", str(gen_dir / f"mbxp_solutions_{stage}.jsonl")]))
    else:
        if data_path:
            evaluate += ["--data_path", data_path]
        commands.append(("evaluate_preds.py", evaluate + ["--path", str(gen_dir / "output.json")]))
    return commands


@functools.lru_cache(maxsize=None)
def _valued_switches(script: str) -> frozenset[str]:
    """The flags of ``script`` that take True/False: left out, such a flag means "not given" (generate_preds'
    --do_sample: the preset's --paper_decoding then samples), not False."""
    import importlib

    from utils.cli import str2bool

    parser = importlib.import_module(script.removesuffix(".py")).build_parser()
    return frozenset(a.dest for a in parser._actions if a.type is str2bool)


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


def _parse_only(script: str, argv: list[str]) -> tuple | None:
    """Parse (and type-check) a stage's arguments as its script does, running nothing. Returns the data split the
    stage reads, as ``load_task_split``'s arguments (None for a stage that reads none; a path of None is the public
    source)."""
    import importlib

    if script in ("tune_foundation_model.py", "tune_fft_baseline.py"):
        from utils.train_args import build_parser, config_from_namespace, refuse_other_methods_flags

        kind = "fft" if script == "tune_fft_baseline.py" else "peft"
        ns = build_parser(kind).parse_args(argv)
        refuse_other_methods_flags(argv, kind, ns.peft_method if kind == "peft" else "fft")
        config = config_from_namespace(ns, kind)
        model = config.model
        return model.task_name, "train", model.data_path, model.mbpp_split, config.train.limit_train_examples
    if script == "generate_preds.py":
        generate_preds = importlib.import_module("generate_preds")
        args = generate_preds.build_parser().parse_args(argv)
        generate_preds.check_args(args)
        return args.task_name, "test", args.data_path, args.mbpp_split, args.limit
    args = importlib.import_module(script.removesuffix(".py")).parse_args(argv)
    if script == "evaluate_preds.py" and 1 not in args.k:  # run_cell reads pass@1 from its summary
        raise UserError(f"--k {','.join(map(str, args.k))}: the results table reports pass@1, so k must include 1 "
                        f"(--set eval.k=1,{','.join(map(str, args.k))})")
    return None


def check_commands(cells: list[Cell]) -> None:
    """Reject a bad preset or --set before any cell runs: a typo would otherwise surface only after hours of
    training, in every cell. Then read each local data split the stages will read, once: a malformed file or an
    empty split would otherwise fail every cell in turn, each after loading its model."""
    splits: dict[tuple, str] = {}
    for cell in cells:
        for script, argv in cell.commands:
            captured = io.StringIO()
            try:
                with contextlib.redirect_stderr(captured):
                    split = _parse_only(script, argv)
            except (SystemExit, UserError) as exc:
                lines = captured.getvalue().strip().splitlines()
                message = str(exc) if isinstance(exc, UserError) else (lines[-1] if lines else f"exit {exc.code}")
                raise UserError(f"{cell.key}: {script} rejects its arguments ({message.removeprefix('error: ')}); "
                                f"fix the preset, --models, --tasks, --methods or --set") from None
            if split is not None and split[2] is not None:
                splits.setdefault(split, f"{cell.key}: {script}")
    for (task, split, path, mbpp_split, limit), reader in splits.items():
        try:
            load_task_split(task, split, path, mbpp_split=mbpp_split, limit=limit)
        except UserError as exc:
            option = "--mbpp_data" if task == "mbpp" else "--cruxeval_data"
            raise UserError(f"{reader} cannot read its data: {exc} (run_experiment.py gives that file with {option})"
                            ) from None


def uncached_hub_models(cells: list[Cell]) -> list[str]:
    """With HF_HUB_OFFLINE set, the hub models and encoders the cells would download (no --model_path or
    --enc_model_path) that are not in the local cache: every cell of them would fail, one after another. One line
    each, naming the --set that gives a local copy."""
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        return []
    from huggingface_hub import try_to_load_from_cache

    from utils.registry import get_encoder_spec, get_model_spec

    wanted = {}
    for cell in cells:
        argv = cell.commands[0][1]

        def value(flag, default=None):
            return argv[argv.index(flag) + 1] if flag in argv else default

        if "--model_path" not in argv and (spec := get_model_spec(value("--model_type"))).hf_id:
            wanted.setdefault((spec.hf_id, "model_path"), cell.model)
        if cell.method in ("idpg", "lopa") and "--enc_model_path" not in argv:
            encoder = get_encoder_spec(value("--enc_model_type", "codesage-small"))
            if encoder.hf_id:
                wanted.setdefault((encoder.hf_id, "enc_model_path"), encoder.name)
    return [f"{name} ({hf_id}) is not in the local cache and HF_HUB_OFFLINE is set: its cells will fail; "
            f"--set {flag}=DIR gives a local copy" for (hf_id, flag), name in wanted.items()
            if not isinstance(try_to_load_from_cache(hf_id, "config.json"), str)]


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
        "n_tasks": main_summary["n_tasks"], "scored_file": pathlib.Path(main_summary["results_path"]).name,
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


def stored_result(cell: Cell) -> dict | None:
    path = cell.directory / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("config_hash") == cell.config_hash() else None
