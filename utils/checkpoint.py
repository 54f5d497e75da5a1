"""Crash-safe training checkpoints: written atomically, found through a ``latest`` pointer, resumed exactly.

Layout under ``<log_dir>/checkpoints/``::

    step_00000050/                 one directory per checkpoint, named by optimizer step
        trainer_state.json         global_step, epoch, batch_in_epoch, tokens, elapsed, the epoch's loss so far
        config.json                the run's resolved configuration
        trainable.safetensors      the trained tensors (every weight for fft)       } without DeepSpeed
        optimizer.pt, scheduler.pt (and scaler.pt with fp16)                        }
        deepspeed/                 DeepSpeed's per-rank model/optimizer files      } with DeepSpeed
        rng_state_<rank>.pt        python, numpy and torch (CPU and CUDA) RNG states of every process
        adapter/                   PEFT methods: a usable adapter (adapter_config.json + adapter_model.safetensors)
    latest                         the name of the newest complete checkpoint

Writing: every file goes into ``.tmp-step_N/``; once all processes are done, the main process fsyncs it,
renames it to ``step_N/`` (one atomic rename) and only then replaces ``latest`` (write, fsync, rename). A crash
at any point leaves ``latest`` naming a complete checkpoint; a leftover ``.tmp-*`` is never read and is removed
by the next save. A save that fails (a full disk) in a one-process run removes its ``.tmp-*`` at once, to give
the space back (with several, other ranks may still be writing into it: it is left, and the error names it). Older
checkpoints are pruned only after the new one is in place, so ``--save_total_limit N`` needs room for N + 1.
Assumes all processes see one file system (true on one node).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.fileio import atomic_write_text, fsync_dir, open_file_modes, unfinished_directory

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "trainable.safetensors"
DEEPSPEED_TAG = "deepspeed"
KILL_HOOK_ENV = "LOPA_TEST_KILL_AT"
"""Test hook: ``<checkpoint name>:written`` (before the rename), ``:moved-aside`` (a re-saved step's old copy moved
aside, the new one not yet in place) or ``:committed`` (after ``latest``) makes the process SIGKILL itself there,
to test recovery from a real crash."""
_NAME = re.compile(r"step_(\d+)")


@dataclass
class TrainerState:
    """Where a run is: enough to continue it exactly."""

    global_step: int = 0
    epoch: int = 0
    """0-based epoch in progress."""
    batch_in_epoch: int = 0
    """Micro-batches of ``epoch`` each process has consumed (a multiple of gradient_accumulation_steps)."""
    tokens: int = 0
    """Input tokens trained on, all processes together."""
    elapsed: float = 0.0
    """Seconds spent training, over all sessions of this run."""
    num_processes: int = 1
    wandb_run_id: str | None = None
    epoch_loss_sum: float = 0.0
    """Sum of the step losses of ``epoch`` so far, so an epoch's mean survives a resume in its middle."""
    epoch_steps: int = 0

    @classmethod
    def read(cls, path: pathlib.Path) -> "TrainerState":
        try:
            values = json.loads(path.read_text())
            return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{path}: unreadable trainer state ({exc}); resume from an earlier checkpoint") from None


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def find_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """A checkpoint directory itself, or the latest one of a log_dir (or of its ``checkpoints/``)."""
    path = pathlib.Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        latest = root / LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            checkpoint = root / name
            if not (checkpoint / STATE_FILE).is_file() and (root / f".old-{name}" / STATE_FILE).is_file():
                checkpoint = root / f".old-{name}"  # a re-save of this step was cut off mid-swap
            if not (checkpoint / STATE_FILE).is_file():
                raise UserError(f"{latest} names {name!r} but {checkpoint / STATE_FILE} is missing; pass one of "
                                f"the step_* directories under {root} to --resume_from")
            return checkpoint
    if (newest := newest_unnamed_checkpoint(path)) is not None:
        return newest
    if (path / "final").is_dir() and ((path / "metrics.jsonl").is_file() or (path / "train.log").is_file()):
        raise UserError(f"--resume_from {path}: this run finished (its model: {path / 'final'}) and keeps no "
                        f"checkpoint (PEFT's default, or --keep_checkpoints false, removes them once final/ is "
                        f"written; --save_every 0 writes none): there is nothing to resume")
    if (path / "metrics.jsonl").is_file() or (path / "train.log").is_file():
        raise UserError(f"--resume_from {path}: this run saved no checkpoint: it stopped before its first one (they "
                        f"come every --save_every; 0 saves only final/), so there is nothing to resume; start over "
                        f"without --resume_from, after removing {path} or with another --log_dir")
    raise UserError(f"--resume_from {path}: not a checkpoint (no {STATE_FILE}) and not a log_dir with "
                    f"{CHECKPOINTS_DIR}/{LATEST}")


def has_resumable_checkpoint(log_dir: pathlib.Path) -> bool:
    """Whether ``log_dir`` holds a checkpoint ``--resume_from log_dir`` continues from: the one ``latest`` names, or
    ``newest_unnamed_checkpoint``."""
    latest = pathlib.Path(log_dir) / CHECKPOINTS_DIR / LATEST
    return latest.is_file() or newest_unnamed_checkpoint(log_dir) is not None


def newest_unnamed_checkpoint(log_dir: pathlib.Path) -> pathlib.Path | None:
    """Without ``latest``, the newest ``step_N/``: a kill between the first checkpoint's rename and ``latest``
    leaves it complete (a ``step_N/`` exists only once complete, and pruning happens after ``latest``)."""
    root = pathlib.Path(log_dir) / CHECKPOINTS_DIR
    if (root / LATEST).is_file() or not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file())
    return found[-1] if found else None


def resume_hint(log_dir: pathlib.Path) -> str:
    """How to go on after a full disk stopped the run in ``log_dir``: from its last complete checkpoint, if any."""
    return f"free space, then {continue_hint(log_dir)}"


def continue_hint(log_dir: pathlib.Path) -> str:
    """How to go on with the run in ``log_dir`` after it stopped: from its last complete checkpoint, if any."""
    latest = log_dir / CHECKPOINTS_DIR / LATEST
    if latest.is_file():
        return (f"rerun with --resume_from {log_dir}: it continues from {latest.read_text().strip()}, the last "
                f"complete checkpoint")
    if (newest := newest_unnamed_checkpoint(log_dir)) is not None:  # complete, but the disk filled before `latest`
        return f"rerun with --resume_from {log_dir}: it continues from {newest.name}, the last complete checkpoint"
    return (f"rerun without --resume_from (no checkpoint was complete), after removing {log_dir} or with another "
            f"--log_dir")


def is_training_config(path: pathlib.Path) -> bool:
    """Whether ``path`` is the config.json a training run of ours writes at its start (with ``script`` and
    ``runtime``), not a model's."""
    try:
        return {"script", "runtime"} <= json.loads(pathlib.Path(path).read_text(encoding="utf-8")).keys()
    except (OSError, ValueError, AttributeError):
        return False


def training_log_dir_hint(directory: pathlib.Path) -> str | None:
    """What to load instead, when ``directory`` is a training run's log_dir given as the model to generate from
    (None when it is not one of our runs: those write ``train.log`` and a ``config.json`` with ``script`` and
    ``runtime`` at their start)."""
    directory = pathlib.Path(directory)
    if not (directory / "train.log").is_file() or not is_training_config(directory / "config.json"):
        return None
    final = directory / "final"
    if final.is_dir():
        flag = "--load_adapter_from" if (final / "adapter_config.json").is_file() else "--load_base_from_path"
        return f"a training log_dir; pass its model, {flag} {final}"
    try:
        step = find_checkpoint(directory)  # what --resume_from would continue from
    except UserError:
        return ("a training log_dir whose run stopped before its first checkpoint and final/: it left no model; "
                "train again")
    if (step / "adapter" / "adapter_config.json").is_file():
        instead = f"a checkpoint's adapter (the latest: --load_adapter_from {step / 'adapter'})"
    elif (step / "trainable.safetensors").is_file():
        instead = f"a checkpoint's weights (the latest: --load_base_from_path {step / 'trainable.safetensors'})"
    else:  # a DeepSpeed checkpoint: its weights are in ZeRO's shards
        instead = (f"the weights zero_to_fp32.py converts from the latest checkpoint (python {step}/zero_to_fp32.py "
                   f"{step} OUT --tag deepspeed --safe_serialization; then --sharded_checkpoint_dir OUT, or "
                   f"--load_base_from_path OUT/model.safetensors for a model under 5 GB)")
    return (f"a training log_dir without final/ (the run did not finish): resume it (--resume_from {directory}), or "
            f"pass {instead}")


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- files
def _fsync_tree(root: pathlib.Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(pathlib.Path(dirpath))


def _torch_save(obj, path: pathlib.Path) -> None:
    # through a Python file: given a path, torch reports a full disk as "unexpected pos" or "iostream error"
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _kill_hook(name: str, stage: str) -> None:
    if os.environ.get(KILL_HOOK_ENV) == f"{name}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(accelerator, model, optimizer, scheduler, state: TrainerState, config: dict,
                    checkpoints_dir: pathlib.Path, *, write_adapter=None, total_limit: int | None = None
                    ) -> pathlib.Path:
    """Write a checkpoint of the state after ``state.global_step`` steps; every process must call this.

    ``model``/``optimizer``/``scheduler`` are the prepared objects. ``write_adapter(directory)`` (main process)
    adds the usable adapter. Returns the committed directory.
    """
    name = checkpoint_name(state.global_step)
    final, tmp = checkpoints_dir / name, checkpoints_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        for stale in checkpoints_dir.glob(".tmp-*"):  # an unfinished save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    alone = accelerator.num_processes == 1  # else another rank may still be writing into tmp: removing it races
    left = "it was removed" if alone else "it is never read: delete it to get its space back"
    with unfinished_directory(tmp, lambda: f"{left}; {resume_hint(checkpoints_dir.parent)}", remove=alone):
        _write_checkpoint_files(accelerator, model, optimizer, scheduler, state, config, tmp, write_adapter)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        open_file_modes(tmp)
        _fsync_tree(tmp)
        _kill_hook(name, "written")
        aside = checkpoints_dir / f".old-{name}"
        if final.exists():  # a re-save of a step (resumed from an earlier checkpoint); `latest` may name it,
            shutil.rmtree(aside, ignore_errors=True)  # so it moves aside and goes only once the new one is in place
            os.replace(final, aside)
            _kill_hook(name, "moved-aside")
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
        atomic_write_text(checkpoints_dir / LATEST, name + "\n")
        for old in checkpoints_dir.glob(".old-*"):  # `latest` names a complete checkpoint again: none is needed
            shutil.rmtree(old, ignore_errors=True)
        _kill_hook(name, "committed")
        if total_limit:
            prune_checkpoints(checkpoints_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint_files(accelerator, model, optimizer, scheduler, state: TrainerState, config: dict,
                            tmp: pathlib.Path, write_adapter) -> None:
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    if deepspeed:  # collective: each rank writes its optimizer partition
        model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    _torch_save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        if not deepspeed:
            weights = trainable_parameters(accelerator.unwrap_model(model))
            save_file({n: p.detach().cpu().contiguous() for n, p in weights.items()}, str(tmp / WEIGHTS_FILE))
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            if accelerator.scaler is not None:
                _torch_save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))


def prune_checkpoints(checkpoints_dir: pathlib.Path, keep: int) -> list[pathlib.Path]:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    latest = (checkpoints_dir / LATEST).read_text().strip() if (checkpoints_dir / LATEST).is_file() else None
    found = sorted((int(m.group(1)), p) for p in checkpoints_dir.iterdir()
                   if p.is_dir() and (m := _NAME.fullmatch(p.name)))
    removed = []
    for _, path in found[:-keep]:
        if path.name != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------- load
def read_resume_state(checkpoint: pathlib.Path, num_processes: int) -> TrainerState:
    """The checkpoint's trainer state, if this run can continue it (cheap: call it before loading models)."""
    state = TrainerState.read(checkpoint / STATE_FILE)
    if state.num_processes != num_processes:
        raise UserError(f"{checkpoint / STATE_FILE}: field 'num_processes' is {state.num_processes} but this run "
                        f"has {num_processes}; resume with the same number of processes (the data order and "
                        f"optimizer partitions depend on it)")
    return state


def load_checkpoint(checkpoint: pathlib.Path, accelerator, model, optimizer, scheduler) -> tuple[TrainerState, dict]:
    """Restore trained tensors, optimizer, scheduler (and loss scaler) in place from ``checkpoint``.

    Returns the trainer state and this process's RNG state, which the caller applies right before training
    continues (building the model and data draws random numbers). Every process must call this.
    """
    state = read_resume_state(checkpoint, accelerator.num_processes)
    if accelerator.distributed_type == "DEEPSPEED":
        if not (checkpoint / DEEPSPEED_TAG).is_dir():
            raise UserError(f"{checkpoint}: no {DEEPSPEED_TAG}/ directory (written without DeepSpeed); resume "
                            f"it without DeepSpeed")
        model.load_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, load_module_strict=False)
    else:
        if not (checkpoint / WEIGHTS_FILE).is_file() and (checkpoint / DEEPSPEED_TAG).is_dir():
            raise UserError(f"{checkpoint}: no {WEIGHTS_FILE} (written with DeepSpeed); resume it with the same "
                            f"accelerate/DeepSpeed configuration")
        _load_trainable(_read(checkpoint / WEIGHTS_FILE, lambda p: load_file(str(p))), checkpoint / WEIGHTS_FILE,
                        accelerator.unwrap_model(model))
        optimizer.load_state_dict(_read(checkpoint / "optimizer.pt", _torch_load))
        if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(_read(checkpoint / "scaler.pt", _torch_load))
    scheduler.load_state_dict(_read(checkpoint / "scheduler.pt", _torch_load))
    return state, _read(checkpoint / f"rng_state_{accelerator.process_index}.pt", _torch_load)


def _torch_load(path: pathlib.Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _read(path: pathlib.Path, load):
    """``load(path)``; a missing or damaged file (cut short after the fact: a copy, a disk error) is one line naming
    it and the checkpoint to resume instead."""
    try:
        return load(path)
    except Exception as exc:  # safetensors and torch raise several types for a damaged file
        what = "missing" if not path.is_file() else f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        checkpoint = path.parent
        this = checkpoint.name.removeprefix(".old-")  # resumed from a re-save's aside copy
        earlier = sorted(p for p in checkpoint.parent.iterdir() if _NAME.fullmatch(p.name) and p.name < this)
        log_dir = checkpoint.parent.parent
        fix = (f"pass an earlier one to --resume_from ({earlier[-1]})" if earlier
               else f"no earlier one is left: start over without --resume_from, after removing {log_dir} or with "
                    f"another --log_dir") + f" (a run_experiment cell: remove {log_dir} and rerun; it trains afresh)"
        raise UserError(f"{path}: {what}; the checkpoint is damaged: {fix}") from None


def _load_trainable(tensors: dict[str, torch.Tensor], path: pathlib.Path, model: torch.nn.Module) -> None:
    params = trainable_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise UserError(f"{path}: tensor {what} for this model; resume with the method and model it was written by")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
