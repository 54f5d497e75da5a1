"""The training scripts' file-system checks, after parsing and before any model loads or any directory is created:
the inputs exist and parse, the log_dir is not another run's (nor a folder a run did not write), and a checkpoint
to resume from is compatible with this run's arguments (``utils.train_args.parse_args`` runs them).
"""
from __future__ import annotations

import pathlib

from utils.cli import check_log_dir
from utils.data import default_data_path, load_task_split, read_json_object, records_digest
from utils.errors import UserError
from utils.train_config import TrainConfig

RESUME_MAY_DIFFER = {"model_path", "enc_model_path", "data_path", "path_to_ds_config", "gradient_checkpointing",
                     "compile", "compile_mode", "compile_encoder", "encoder_graphs", "selective_logits", "fused_adamw",
                     "packing", "pad_to_multiple_of"}
"""Arguments a resumed run may change (they locate files, or trade memory for time); every other model/train
argument must match, but for ``BATCH_SPLIT``."""
BATCH_SPLIT = ("per_gpu_train_batch_size", "gradient_accumulation_steps")
"""A resumed run may split the same optimizer steps into other micro-batches (``_check_batch_split``): a run that
ran out of GPU memory goes on with a smaller micro-batch and more accumulation."""


def check_files(config: TrainConfig) -> None:
    """File-system checks: inputs exist and parse, the log_dir is not another run's, resume is compatible."""
    train, out = config.train, config.output
    if train.path_to_ds_config is not None:
        read_json_object(train.path_to_ds_config, "--path_to_ds_config")
    if train.mixed_precision == "fp16" or train.model_dtype == "fp16":
        import torch

        if not torch.cuda.is_available():
            if train.mixed_precision == "fp16":  # asked for as --mixed_precision fp16 or the original's --fp16 True
                raise UserError("--mixed_precision fp16 (or the original's --fp16 True) needs a CUDA GPU; on the CPU "
                                "use --mixed_precision bf16 or no (or --fp16 False)")
            raise UserError("--model_dtype fp16 needs a CUDA GPU; on the CPU use --model_dtype bf16, or fp32")
    if out.wandb_logging:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("--wandb_logging needs the wandb package (pip install wandb)")
    check_log_dir(out.log_dir)
    data_path = config.model.data_path or default_data_path(config.model.task_name)
    records = None
    if data_path is not None:  # a local file: a wrong one fails here, before a model loads or log_dir exists
        records = load_task_split(config.model.task_name, "train", data_path, config.model.mbpp_split,
                                  limit=train.limit_train_examples)
    log_dir = pathlib.Path(out.log_dir)
    if out.resume_from is None:
        for taken in ("metrics.jsonl", "checkpoints", "final"):
            if (log_dir / taken).exists():
                if (log_dir / "final").exists():  # finished (the PEFT default then keeps no checkpoint)
                    raise UserError(f"--log_dir {log_dir} already holds a finished run (its model: "
                                    f"{log_dir / 'final'}); choose another --log_dir")
                if not _has_checkpoint(log_dir):
                    raise UserError(f"--log_dir {log_dir} already holds a run ({log_dir / taken}) that stopped "
                                    f"before its first checkpoint, so it cannot be resumed; remove {log_dir} or "
                                    f"choose another --log_dir")
                raise UserError(f"--log_dir {log_dir} already holds a run ({log_dir / taken}); pass "
                                f"--resume_from {log_dir} to continue it, or choose another --log_dir")
        _check_not_foreign(log_dir)
        return
    from utils.checkpoint import find_checkpoint  # only resumed runs pay for this import

    saved_path = find_checkpoint(out.resume_from) / "config.json"
    saved = read_json_object(saved_path, "checkpoint config")
    check_resume_compatible(config, saved, saved_path)
    recorded = saved.get("runtime", {}).get("train_data_sha256")  # absent: a checkpoint from before it was kept
    if records is not None and recorded is not None and records_digest(records) != recorded:
        raise UserError(f"{saved_path}: the run trained on other data than --data_path {data_path} holds (its "
                        f"train split's records differ); pass the file it was trained on to resume")


RUN_ENTRIES = frozenset({"train.log", "config.json", ".lock", "metrics.jsonl", "loss.png", "checkpoints", "final",
                         ".tmp-final", "wandb"})
"""What a training run writes into its log_dir."""


def _check_not_foreign(log_dir: pathlib.Path) -> None:
    """A log_dir holding anything else (a model directory given by mistake, the project's root) is refused: the run
    would write its config.json over a model's and its final/ among other files."""
    from utils.checkpoint import is_training_config
    from utils.prediction_files import CONFIG_FILE

    if not log_dir.is_dir():
        return
    foreign = sorted(p.name for p in log_dir.iterdir()
                     if p.name not in RUN_ENTRIES and not (p.name.startswith(".") and p.name.endswith(".tmp"))
                     and not (p / CONFIG_FILE).is_file())  # predictions generate_preds.py wrote (README's preds/)
    if (log_dir / "config.json").is_file() and not is_training_config(log_dir / "config.json"):
        foreign.insert(0, "config.json (a model's)")
    if foreign:
        raise UserError(f"--log_dir {log_dir} holds files no training run wrote ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); a run writes its config.json and final/ there: "
                        f"choose a new or empty --log_dir")


def _has_checkpoint(log_dir: pathlib.Path) -> bool:
    """Whether --resume_from log_dir has a `latest` to follow (a broken one gets its own error there)."""
    from utils.checkpoint import LATEST, has_resumable_checkpoint

    return has_resumable_checkpoint(log_dir) or (log_dir / LATEST).is_file()


def check_resume_compatible(config: TrainConfig, saved: dict, saved_path) -> None:
    """The data order, schedule and trained tensors depend on these arguments: they must match the checkpoint."""
    if saved.get("script") != config.script:
        scripts = {"peft": "tune_foundation_model.py", "fft": "tune_fft_baseline.py"}
        raise UserError(f"{saved_path}: field 'script' is {saved.get('script')!r}; resume it with "
                        f"{scripts.get(saved.get('script'), saved.get('script'))} (this is {scripts[config.script]})")
    from utils.registry import METHOD_FLAGS

    current = config.to_dict()
    for section in ("model", "train"):
        for name, value in current[section].items():
            # another method's flag did nothing (older runs recorded what the command line gave them)
            if name in RESUME_MAY_DIFFER or config.model.method not in METHOD_FLAGS.get(name, (config.model.method,)):
                continue
            if section == "train" and name in BATCH_SPLIT and name in saved.get(section, {}):
                continue  # _check_batch_split
            if name not in saved.get(section, {}):
                _check_unrecorded(config, section, name, value, saved_path)
                continue
            if saved[section][name] != value:
                fix = (f"drop --{_flag(name)}" if saved[section][name] is None
                       else f"pass --{_flag(name)} {saved[section][name]}")
                raise UserError(f"{saved_path}: field '{section}.{name}' is {saved[section][name]!r} but this run "
                                f"has {value!r}; {fix} to resume, or start a new run")
    _check_batch_split(config, saved, saved_path)


def _check_batch_split(config: TrainConfig, saved: dict, saved_path) -> None:
    """Another micro-batch and accumulation is accepted where every remaining step takes the same examples
    (``train_setup.batch_split_refusal``), judged from the checkpoint's record of the process count and the examples
    (the trainer checks both again, and converts the checkpoint's position in the epoch)."""
    from utils.train_setup import check_batch_split

    train, runtime = saved.get("train", {}), saved.get("runtime", {})
    if not all(name in train for name in BATCH_SPLIT):
        return  # unrecorded: accepted, as other unrecorded fields are
    split = (config.train.per_gpu_train_batch_size, config.train.gradient_accumulation_steps)
    # absent from a record: the trainer checks the real count
    check_batch_split(saved_path, tuple(train[name] for name in BATCH_SPLIT), split, runtime.get("train_examples", 0),
                      runtime.get("num_processes", 1), group_by_length=config.train.group_by_length)


def _check_unrecorded(config: TrainConfig, section: str, name: str, value, saved_path) -> None:
    """A checkpoint written before a field existed ran with that field's old behaviour, not with any value."""
    if (section, name) == ("model", "encoder_dropout") and config.model.uses_encoder and value:
        raise UserError(f"{saved_path}: no field 'model.encoder_dropout' (written before it existed, when the frozen "
                        f"encoder always ran in eval mode) but this run has True; pass --encoder_dropout False to "
                        f"resume, or start a new run")


def _flag(name: str) -> str:
    return {"method": "peft_method"}.get(name, name)
