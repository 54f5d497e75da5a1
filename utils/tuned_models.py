"""Which model a generation loads, from generate_preds.py's flags, and loading it: a PEFT adapter on its base, a
full fine-tuning's weights (a Hugging Face directory, a state_dict file, DeepSpeed shards), or the untuned model. The
checks here refuse what would load silently wrong (a training checkpoint, another --model_type, the other MBPP split's
tuning) and warn where a run was tuned for another task.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from utils.errors import UserError
from utils.registry import METHOD_FLAGS, PEFT_METHODS


def resolve_method(args: argparse.Namespace) -> str:
    """The method to load, from --peft_method or what was given; rejects contradictory flags."""
    if args.clf_predictor_path:
        clf = pathlib.Path(args.clf_predictor_path)
        if args.load_adapter_from is None and (clf / "adapter_config.json").is_file():
            args.load_adapter_from = str(clf)
        elif args.load_adapter_from is None or clf.resolve() != pathlib.Path(args.load_adapter_from).resolve():
            print(f"warning: --clf_predictor_path {clf} is not used: the LOPA/IDPG heads are read from the adapter "
                  f"directory (--load_adapter_from)", file=sys.stderr)
    checkpoint = args.load_base_from_path or args.sharded_checkpoint_dir
    if args.peft_method:
        method = args.peft_method
    elif args.load_adapter_from:
        from custom_peft import read_adapter_config

        method = read_adapter_config(args.load_adapter_from)["method"]
    else:  # a full fine-tuning's final/ given as --model_path says so in its training_config.json
        method = "fft" if checkpoint or _trained_model_field(args.model_path, "method") == "fft" else "none"
    if method in PEFT_METHODS and not args.load_adapter_from:
        raise UserError(f"--peft_method {method} needs --load_adapter_from DIR (the adapter directory training wrote)")
    if method not in PEFT_METHODS and args.load_adapter_from:
        raise UserError(f"--load_adapter_from is for lora/pt/idpg/lopa, not --peft_method {method}")
    if method in PEFT_METHODS and checkpoint:  # it was ignored, and recorded in the config as if used
        flag = "--load_base_from_path" if args.load_base_from_path else "--sharded_checkpoint_dir"
        raise UserError(f"{flag} is for --peft_method fft: a {method} adapter goes on the base model, which "
                        f"--model_path (a Hugging Face model directory) names; drop {flag}")
    if method == "none" and checkpoint:
        raise UserError("--peft_method none loads the untuned model; for a tuned checkpoint pass --peft_method fft")
    if method == "fft" and not (checkpoint or args.model_path):
        raise UserError("--peft_method fft needs the tuned model: --load_base_from_path, --sharded_checkpoint_dir "
                        "or --model_path")
    # A flag the method never reads would pass silently (an adapter's own config checks m, r and the encoder type).
    flags = ("enc_model_path",) if method in PEFT_METHODS else ("enc_model_type", "enc_model_path", "lp_rank",
                                                                   "num_virtual_tokens")
    for flag in flags:
        if getattr(args, flag) is not None and method not in METHOD_FLAGS[flag]:
            raise UserError(f"--{flag} is for {'/'.join(METHOD_FLAGS[flag])} adapters, not --peft_method {method}; "
                            f"drop it")
    if args.load_adapter_from and not pathlib.Path(args.load_adapter_from).is_dir():
        raise UserError(f"--load_adapter_from {args.load_adapter_from}: not a directory")
    for flag in ("load_base_from_path", "sharded_checkpoint_dir"):
        if getattr(args, flag) and not pathlib.Path(getattr(args, flag)).exists():
            raise UserError(f"--{flag} {getattr(args, flag)}: no such file or directory")
    return method


def _tuned_directory(args: argparse.Namespace) -> str | None:
    """The directory whose ``training_config.json`` says how the model to load was tuned (the adapter, else the FFT
    checkpoint, else a ``--model_path`` that may be an FFT ``final/``)."""
    return args.load_adapter_from or args.load_base_from_path or args.sharded_checkpoint_dir or args.model_path


def warn_if_tuned_for_another_task(args: argparse.Namespace) -> str | None:
    """The warning (printed, and returned) when the directory to load is a training run's ``final/`` whose
    ``training_config.json`` names another task than ``--task_name``: allowed (a transfer experiment), but more
    often a wrong path. Directories without that file (or not ours to read) say nothing."""
    directory = _tuned_directory(args)
    trained_on = _trained_model_field(directory, "task_name")
    if trained_on is None or trained_on == args.task_name:
        return None
    message = (f"warning: {directory} was tuned on {trained_on} (training_config.json), and this run generates for "
               f"{args.task_name}; if that is not meant, pass the run trained on {args.task_name}")
    print(message, file=sys.stderr)
    return message


def check_trained_on_this_mbpp_split(args: argparse.Namespace) -> None:
    """Refuse MBPP test predictions from a run trained on the other MBPP split (``training_config.json``'s
    ``model.mbpp_split``): each split's train tasks overlap the other's test tasks, so the score would count tasks
    the model was tuned on."""
    from utils.data import MBPP_SPLITS

    directory = _tuned_directory(args)
    if args.task_name != "mbpp" or _trained_model_field(directory, "task_name") != "mbpp":
        return
    trained = _trained_model_field(directory, "mbpp_split") or "paper"  # the default when it was trained
    if trained == args.mbpp_split or trained not in MBPP_SPLITS:
        return
    (lo, hi), (test_lo, test_hi) = MBPP_SPLITS[trained]["train"], MBPP_SPLITS[args.mbpp_split]["test"]
    seen = max(0, min(hi, test_hi) - max(lo, test_lo) + 1)
    raise UserError(f"{directory} was tuned on the {trained} MBPP split's train tasks ({lo}-{hi}; "
                    f"training_config.json), {seen} of which are in the {args.mbpp_split} split's test tasks "
                    f"({test_lo}-{test_hi}) this run would score; pass --mbpp_split {trained}")


def fft_sources(args: argparse.Namespace) -> tuple[str | None, str | None, str | None, str | None]:
    """``(HF model directory, single state_dict file, sharded directory, directory of the weights' config.json)``
    from the FFT flags; the last is set only for a checkpoint directory with a config.json whose weights
    ``from_pretrained`` cannot read (``wrapped_checkpoint``)."""
    from utils.generation import wrapped_checkpoint

    hf_dir = state_file = sharded = config_dir = None
    base = args.load_base_from_path
    if base:
        _reject_training_checkpoint(pathlib.Path(base))
        if pathlib.Path(base).is_file():
            state_file = base
        elif (pathlib.Path(base) / "config.json").is_file():
            hf_dir = base
        else:
            raise UserError(f"--load_base_from_path {base}: neither a state_dict file nor a Hugging Face model "
                            f"directory (no config.json); for a sharded checkpoint pass --sharded_checkpoint_dir")
    if args.sharded_checkpoint_dir:
        if base:
            raise UserError("give either --load_base_from_path or --sharded_checkpoint_dir, not both")
        if (pathlib.Path(args.sharded_checkpoint_dir) / "config.json").is_file():
            hf_dir = args.sharded_checkpoint_dir
        else:
            sharded = args.sharded_checkpoint_dir
    if hf_dir is not None and (routed := wrapped_checkpoint(hf_dir)) is not None:
        # zero_to_fp32.py's output with a config.json copied in: from_pretrained would find none of its names
        # (all under "backbone.") and leave every weight random, with a warning only
        hf_dir, config_dir, (state_file, sharded) = None, hf_dir, routed
    return hf_dir, state_file, sharded, config_dir


def _reject_training_checkpoint(path: pathlib.Path) -> None:
    """A training checkpoint (``checkpoints/step_N``, or a file in it) or a training log_dir named as the model:
    point at what loads."""
    from utils.checkpoint import training_log_dir_hint

    if path.is_dir() and (hint := training_log_dir_hint(path)) is not None:
        raise UserError(f"--load_base_from_path {path}: {hint}")
    step = path if path.is_dir() else path.parent
    if not (step / "trainer_state.json").is_file():
        return
    if (step / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"--load_base_from_path {path}: a checkpoint of a PEFT run, not a fully fine-tuned model; "
                        f"pass --load_adapter_from {step / 'adapter'}")
    if path.is_dir() and (step / "trainable.safetensors").is_file():
        raise UserError(f"--load_base_from_path {path}: a training checkpoint directory; pass its weights file, "
                        f"--load_base_from_path {step / 'trainable.safetensors'}")


def _trained_model_field(directory: str | None, field: str):
    """``model.<field>`` of the ``training_config.json`` a training run writes into its final/, or None (no such
    file, or one that is not ours to judge: the model directory itself is what loads)."""
    path = pathlib.Path(directory or "") / "training_config.json"
    if directory is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model", {}).get(field)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def _check_trained_model_type(model_dir: str | None, model_type: str) -> None:
    """A full fine-tuning's final/ names its --model_type in training_config.json: another one would load the
    directory's own architecture and tokenizer anyway, under the wrong name in generate_preds_config.json."""
    trained = _trained_model_field(model_dir, "model_type")
    if trained is not None and trained != model_type:
        path = pathlib.Path(model_dir) / "training_config.json"
        raise UserError(f"{path}: field 'model.model_type' is {trained!r} but --model_type is {model_type!r}; "
                        f"pass --model_type {trained}")


def load_model(args: argparse.Namespace, method: str):
    """``(TunedModel in eval mode, tokenizer, encoder tokenizer or None)``."""
    from custom_peft import build_model, load_tuned_model
    from utils.generation import load_fft_weights

    if method in PEFT_METHODS:
        model, tokenizer = load_tuned_model(
            args.load_adapter_from, args.model_type, method=method, num_virtual_tokens=args.num_virtual_tokens,
            lp_rank=args.lp_rank, enc_model_type=args.enc_model_type, dtype=args.dtype, model_path=args.model_path,
            enc_model_path=args.enc_model_path)
    else:
        hf_dir, state_file, sharded, config_dir = fft_sources(args)
        _check_trained_model_type(hf_dir or args.model_path, args.model_type)
        # a checkpoint file or shards supply every weight: the base's are not read (nor downloaded) first
        model, tokenizer = build_model(method, args.model_type, dtype=args.dtype, model_path=hf_dir or args.model_path,
                                       seed=args.seed, empty_weights=bool(state_file or sharded), config_dir=config_dir)
        load_fft_weights(model.lm, state_dict_file=state_file, sharded_dir=sharded)
        model.requires_grad_(False)
    model.eval()
    return model, tokenizer, model.enc_tokenizer
