"""The pipeline behind run_experiment.py: a grid of cells (model × task × method), each trained, generated,
post-processed and evaluated by the project's own scripts, with results cached per cell.

A cell's identity is a hash of everything that decides its result (its commands' arguments and the data file's
content); a cell whose stored result has the same hash is skipped, so changing one hyperparameter redoes only the
cells it reaches. Each stored result records the commands, the seed and the git commit that produced it.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import pathlib
import shutil
import subprocess
import time

from utils.data import default_data_path
from utils.errors import UserError
from utils.fileio import atomic_write_text
from utils.registry import METHODS, TASKS

ROW_NAMES = {"none": "None", "fft": "FFT", "lora": "LoRA", "pt": "PT", "idpg": "IDPG", "lopa": "LOPA"}
COLUMN_NAMES = {"cruxeval_input_prediction": "CruxEval-I", "cruxeval_output_prediction": "CruxEval-O",
                "mbpp": "MBPP"}
PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Preset:
    """A grid and the arguments of each stage. ``train``/``gen``/``eval`` map flag names to values (``True`` is
    a bare flag); ``per_method`` and ``per_task`` override ``train`` for one method or task."""

    name: str
    models: list[str]
    methods: list[str]
    tasks: list[str]
    encoder: str
    seed: int = 9876
    train: dict = dataclasses.field(default_factory=dict)
    per_method: dict = dataclasses.field(default_factory=dict)
    per_task: dict = dataclasses.field(default_factory=dict)
    gen: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    """task family (mbpp / cruxeval) -> JSONL path; missing means the public source."""


def smoke_preset() -> Preset:
    """Tiny models, a few real records (or the project's fixtures), CPU: all 18 cells in about a minute."""
    return Preset(
        name="smoke", models=["tiny-phi-2"], methods=list(METHODS), tasks=list(TASKS), encoder="tiny-roberta",
        train={"num_virtual_tokens": 4, "lp_rank": 1, "num_epochs": 1, "max_train_steps": 3,
               "per_gpu_train_batch_size": 2, "limit_train_examples": 6, "max_length": 384,
               "mixed_precision": "no"},
        per_method={"fft": {"lr": 1e-4}},
        gen={"limit": 4, "batch_size": 4, "max_new_tokens": 24, "no_progress": True},
        eval={"n_workers": 2, "timeout": 5, "k": "1", "no_progress": True},
    )


def paper_phi2_preset() -> Preset:
    """The paper's settings for phi-2 (spec §10.5), for one GPU: effective batch 8 through gradient accumulation
    (the paper ran 4 GPUs × 2); m = 10, r = 1, CodeSage-small, 10 epochs, lr 1e-3 (PT/IDPG/LOPA), 1e-4 (LoRA),
    1e-5 (FFT; 4 epochs on CRUXEval); the paper's sampling at generation."""
    return Preset(
        name="paper-phi-2", models=["phi-2"], methods=list(METHODS), tasks=list(TASKS), encoder="codesage-small",
        train={"num_virtual_tokens": 10, "lp_rank": 1, "num_epochs": 10, "per_gpu_train_batch_size": 2,
               "gradient_accumulation_steps": 4, "mixed_precision": "bf16"},
        per_task={"cruxeval_input_prediction": {"fft": {"num_epochs": 4}},
                  "cruxeval_output_prediction": {"fft": {"num_epochs": 4}}},
        gen={"paper_decoding": True, "batch_size": 16, "no_progress": True},
        eval={"k": "1", "no_progress": True},
    )


PRESETS = {"smoke": smoke_preset, "paper-phi-2": paper_phi2_preset}


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """``section.flag=value`` (section: train, gen, eval, or a method name for its training) or ``flag=value``
    (training, every method)."""
    preset = copy.deepcopy(preset)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. lopa.lp_rank=2 or train.lr=1e-3")
        section, _, flag = key.rpartition(".")
        parsed: object = {"true": True, "false": False}.get(value.lower(), value)
        if section in ("", "train"):
            preset.train[flag] = parsed
        elif section in ("gen", "eval"):
            getattr(preset, section)[flag] = parsed
        elif section in METHODS:
            preset.per_method.setdefault(section, {})[flag] = parsed
        else:
            raise UserError(f"--set {item!r}: unknown section {section!r}; use train, gen, eval or a method "
                            f"({', '.join(METHODS)})")
    return preset


def _flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(str(value))
    return out


# Training flags that only some methods read; left out elsewhere so they do not reach those cells' hashes.
_METHOD_ONLY = {"num_virtual_tokens": ("pt", "idpg", "lopa"), "lp_rank": ("lopa",), "enc_model_type": ("idpg", "lopa"),
                "lora_dim": ("lora",), "lora_alpha": ("lora",), "lora_dropout": ("lora",)}


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
        data_digest = None
        if self.data_path:
            data_digest = hashlib.sha256(pathlib.Path(self.data_path).read_bytes()).hexdigest()
        payload = {"commands": [(s, [a for a in argv if str(self.directory) not in a]) for s, argv in self.commands],
                   "data": data_digest}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
        train = {k: v for k, v in preset.train.items() if method in _METHOD_ONLY.get(k, (method,))}
        if method in ("idpg", "lopa"):
            train["enc_model_type"] = preset.encoder
        train.update(preset.per_method.get(method, {}))
        train.update(preset.per_task.get(task, {}).get(method, {}))
        argv = (["--peft_method", method] if method != "fft" else []) + base + _flags(train)
        commands.append(("tune_fft_baseline.py" if method == "fft" else "tune_foundation_model.py",
                         argv + ["--log_dir", str(train_dir)]))
    gen = base + ["--peft_method", method] + _flags(preset.gen) + ["--log_dir", str(gen_dir)]
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


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _script_main(script: str):
    import importlib

    return importlib.import_module(script.removesuffix(".py")).main


def run_cell(cell: Cell, seed: int) -> dict:
    """Run every stage of a cell in this process (through each script's ``main``); return its result record."""
    if cell.directory.exists():
        shutil.rmtree(cell.directory)
    cell.directory.mkdir(parents=True)
    start = time.perf_counter()
    summaries = []
    for script, argv in cell.commands:
        try:
            value = _script_main(script)(argv)
        except SystemExit as exc:  # cli_entry turns a UserError into exit 2
            raise RuntimeError(f"{cell.key}: {script} exited with {exc.code}") from None
        if script == "evaluate_preds.py":
            summaries.append(value)
    main_summary = summaries[0]
    result = {
        "model": cell.model, "task": cell.task, "method": cell.method, "pass@1": main_summary["pass@1"],
        "n_tasks": main_summary["n_tasks"], "scored_file": pathlib.Path(main_summary["results_path"]).name,
        "commands": [" ".join(["python", script] + argv) for script, argv in cell.commands],
        "seed": seed, "git_commit": git_commit(), "config_hash": cell.config_hash(),
        "seconds": round(time.perf_counter() - start, 1),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if len(summaries) > 1:
        result["mbpp_stage2_pass@1"] = summaries[1]["pass@1"]
    atomic_write_text(cell.directory / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def stored_result(cell: Cell) -> dict | None:
    path = cell.directory / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("config_hash") == cell.config_hash() else None
