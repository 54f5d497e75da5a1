"""run_experiment's grid before anything runs: its cells (model × task × method), each cell's commands and hashes,
and the checks that refuse a bad preset, an unreadable data file or a model missing from an offline cache.

A cell's identity is a hash of its commands' arguments and its data file's content (``Cell.config_hash``); a cell
whose stored result has the same hash is skipped, so changing one hyperparameter redoes only the cells it reaches.
The code is NOT part of the hash. Its training and generation stages have hashes of their own, so a cell whose later
settings change keeps what those stages did (utils/experiment.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib

from utils.data import default_data_path, load_task_split
from utils.errors import UserError
from utils.presets import Preset
from utils.registry import METHOD_FLAGS


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
            commands.append(("evaluate_preds.py",
                             evaluate + ["--path", str(gen_dir / f"mbxp_solutions_{stage}.jsonl")]))
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
