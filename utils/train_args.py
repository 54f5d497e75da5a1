"""The command line of the two training scripts (tune_foundation_model.py, tune_fft_baseline.py).

Parsing has no side effects: every value is checked — names against the registry, numbers, files, a checkpoint
to resume from and its compatibility — before any model loads or any directory is created. A bad value ends
the script with one ``error: ...`` line and exit status 2 (``utils.errors.cli_entry``). The result is a
``utils.train_config.TrainConfig``. This module parses and types the values; the checks that read files (data,
log_dir, the checkpoint to resume from) are utils/train_checks.py's.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from utils.cli import ArgumentParser, add_model_args, default_log_dir, str2bool
from utils.errors import UserError
from utils.registry import PEFT_METHODS, get_encoder_spec
from utils.train_checks import check_files
from utils.train_config import (COMPILE_MODES, GRAPHS_PAD_MULTIPLE, MODEL_DTYPES, PRECISIONS, SCHEDULERS, ModelArgs,
                                OutputArgs, SaveEvery, TrainArgs, TrainConfig)

PAPER_LR = {"pt": 1e-3, "idpg": 1e-3, "lopa": 1e-3, "lora": 1e-4, "fft": 1e-5}
"""Learning rates behind the paper's results (spec §10.5), used when --lr is not given."""


def _bool_flag(group, name: str, help: str, default: bool = False) -> None:
    """``--name`` alone means True; ``--name True|False`` is also accepted (the original's scripts pass values)."""
    group.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                       help=help)


def _lr_value(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


# ---------------------------------------------------------------------------------------------- parsers
def _add_train_args(parser: ArgumentParser, fft: bool) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--num_epochs", type=int, default=10, help="epochs over the train split")
    g.add_argument("--per_gpu_train_batch_size", type=int, default=2, help="micro-batch per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step (effective batch = batch x processes x this)")
    lr_help = ("peak learning rate; auto = 1e-5" if fft else
               "peak learning rate; auto = 1e-3 for pt/idpg/lopa, 1e-4 for lora (the paper's)")
    g.add_argument("--lr", type=_lr_value, default="auto", metavar="LR", help=lr_help)
    g.add_argument("--weight_decay", type=float, default=0.05 if fft else 0.0,
                   help="AdamW weight decay (never on biases and norm weights)")
    g.add_argument("--lr_scheduler_type", default="linear", choices=SCHEDULERS,
                   help="transformers schedule, stepped once per optimizer step")
    g.add_argument("--num_warmup_steps", type=int, default=0, help="warmup steps; > 0 overrides --warmup_ratio")
    g.add_argument("--warmup_ratio", type=float, default=0.1 if fft else 0.0,
                   help="warmup as a fraction of all optimizer steps (used when --num_warmup_steps is 0)")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="stop after this many optimizer steps (overrides --num_epochs; sizes the schedule)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 turns it off")
    g.add_argument("--mixed_precision", default="auto", choices=PRECISIONS,
                   help="auto: the accelerate launcher's setting, else the DeepSpeed JSON's, else bf16 on a GPU "
                        "that supports it, else no")
    g.add_argument("--model_dtype", default="fp32", choices=MODEL_DTYPES,
                   help="dtype of the frozen foundation model and encoder (trained tensors stay fp32); fft needs fp32")
    _bool_flag(g, "gradient_checkpointing", "recompute activations in the backward pass (less memory)")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile each decoder layer and lopa/idpg's heads (same losses, but dropout draws other "
                        "masks; ~2x the tokens/s of plain peft on a GPU; see BENCHMARKS.md); auto: on with CUDA "
                        "without DeepSpeed")
    g.add_argument("--compile_mode", default="auto", choices=COMPILE_MODES,
                   help="torch.compile mode of the decoder layers; reduce-overhead replays them from CUDA graphs, one "
                        "per batch shape (fewer host launches: LoRA on deepseek-1.3b 1.3-1.4x the tokens/s in "
                        "bench_train on an H100), and is refused with --compile off, --gradient_checkpointing and "
                        "under DeepSpeed; auto: reduce-overhead for pt/lora/lopa/idpg in one process on CUDA where "
                        "none of those is asked for, nor --encoder_graphs, else default (logged)")
    _bool_flag(g, "compile_encoder", "with --compile, compile the frozen encoder's layers too (lopa/idpg; the same "
                                     "instance embeddings, far fewer kernel launches); False: it runs eager", True)
    _bool_flag(g, "encoder_graphs", "replay lopa/idpg's frozen encoder from CUDA graphs, one per batch shape (its "
                                    "widths padded up to a multiple of 64, masked); CUDA without DeepSpeed only; "
                                    "instead of --compile_encoder; slower than it on an H100 (BENCHMARKS.md)")
    _bool_flag(g, "selective_logits", "project to the vocabulary only at supervised positions (the same loss, "
                                      "less memory and time); False: full logits, as plain transformers", True)
    _bool_flag(g, "fused_adamw", "the fused CUDA AdamW kernel (the same updates up to rounding); False: torch's "
                                 "default implementation", True)
    _bool_flag(g, "packing", "lay a batch's examples end to end in fewer rows, each attending only to itself, "
                             "when that costs less than padding them (the same loss); False: padded rows", True)
    _bool_flag(g, "pad_to_max_length", "pad every batch to the task's maximum length, as the original "
                                       "(default: pad to the longest row)")
    g.add_argument("--pad_to_multiple_of", type=int, default=None, metavar="N",
                   help=f"round each batch's width up to a multiple of N, padded and packed rows alike, so that "
                        f"batches take few shapes (the same loss); 0 or 1: off (default: {GRAPHS_PAD_MULTIPLE} where "
                        f"the layers compile in mode reduce-overhead, asked for or chosen by --compile_mode auto, "
                        f"else off: so not on a machine without CUDA)")
    _bool_flag(g, "group_by_length", "batch examples of similar length together (less padding)")
    g.add_argument("--limit_train_examples", type=int, default=None,
                   help="train on the first N examples of the split only (smoke runs, tests)")
    g.add_argument("--max_length", type=int, default=None,
                   help="tokens per example, without virtual tokens (default: the task's, MBPP 581-m for pt/idpg/lopa "
                        "and 581 otherwise, CRUXEval 512); longer ones lose prompt tokens on the left")
    g.add_argument("--path_to_ds_config", default=None, metavar="JSON",
                   help="DeepSpeed JSON when launched with `deepspeed` (with `accelerate launch`, the "
                        "--config_file YAML names it)")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="set by the deepspeed launcher; the rank is read from the environment")


def _add_output_args(parser: ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--save_every", default=None, metavar="N[epochs|steps]",
                   help="checkpoint every N epochs (2, 2epochs) or N optimizer steps (50steps); 0 or -1: only "
                        "final/ (default: 1 epoch for lora/pt/idpg/lopa, keeping the newest; 0 for full "
                        "fine-tuning, whose checkpoint holds the whole model and its AdamW states)")
    g.add_argument("--save_total_limit", type=int, default=None,
                   help="keep only the newest N checkpoints (default: all, but 1 under the PEFT default "
                        "--save_every)")
    _bool_flag(g, "keep_checkpoints", "keep checkpoints/ once final/ is written (default: yes when --save_every is "
               "given, no under the PEFT default)", default=None)
    g.add_argument("--resume_from", default=None, metavar="DIR",
                   help="a checkpoint directory, or a log_dir (resumes its latest checkpoint)")
    _bool_flag(g, "wandb_logging", "log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--project_name", default="PromptTuningModel", help="wandb project")
    g.add_argument("--log_every", type=int, default=1, help="optimizer steps between metrics.jsonl lines")


PEFT_DESCRIPTION = """\
Tune a foundation model with a PEFT method (lora, pt, idpg, lopa) on MBPP or CRUXEval.

  python tune_foundation_model.py --peft_method lopa --task_name mbpp --model_type phi-2
  accelerate launch --config_file config_files/config_ds_zero_stage2_no_fp16.yaml tune_foundation_model.py ...

Writes to --log_dir: config.json, metrics.jsonl, train.log, loss.png, checkpoints/ (by default one per epoch, removed
once final/ is written) and the adapter in final/. See docs/TRAINING.md."""

FFT_DESCRIPTION = """\
Full fine-tuning baseline: every weight of the foundation model trains; final/ is a Hugging Face model
directory (generate_preds.py --load_base_from_path <log_dir>/final).

  deepspeed tune_fft_baseline.py --path_to_ds_config config_files/zero_stage3_config.json --fp16 True \\
      --gradient_accumulation_steps 2
  accelerate launch --config_file config_files/config_ds_zero3_fft.yaml tune_fft_baseline.py --task_name mbpp ...

See docs/TRAINING.md."""


def _peft_method(value: str) -> str:
    """--peft_method, with the way out for the two methods this script does not train."""
    if value in PEFT_METHODS:
        return value
    elsewhere = {"fft": "; full fine-tuning is tune_fft_baseline.py",
                 "none": "; the untuned model needs no training (generate_preds.py --peft_method none)"}
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(PEFT_METHODS)})"
                                     f"{elsewhere.get(value, '')}")


def build_parser(script: str) -> ArgumentParser:
    """The argument parser of ``tune_foundation_model.py`` (script="peft") or ``tune_fft_baseline.py`` ("fft")."""
    fft = script == "fft"
    parser = ArgumentParser(prog=f"{'tune_fft_baseline' if fft else 'tune_foundation_model'}.py",
                            description=FFT_DESCRIPTION if fft else PEFT_DESCRIPTION)
    if not fft:
        parser.add_argument("--peft_method", required=True, type=_peft_method, metavar="METHOD",
                            help=f"one of: {', '.join(PEFT_METHODS)}")
    add_model_args(parser)
    if fft:
        # The seed README's FFT command names neither task nor model: default to its phi-2 / MBPP row.
        for action in parser._actions:
            if action.dest in ("task_name", "model_type"):
                action.required = False
        parser.set_defaults(task_name="mbpp", model_type="phi-2")
    else:
        g = parser.add_argument_group("lora")
        g.add_argument("--lora_dim", type=int, default=16, help="LoRA rank (the paper's r=16)")
        g.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha")
        g.add_argument("--lora_dropout", type=float, default=0.1, help="LoRA dropout")
        _bool_flag(parser.add_argument_group("idpg / lopa"), "encoder_dropout",
                   "the frozen encoder's own dropout acts in training, as in the original (noisy instance "
                   "embeddings); False: it always runs in eval mode", True)
    _add_train_args(parser, fft)
    _add_output_args(parser)
    if fft:
        _bool_flag(parser.add_argument_group("compatibility"), "fp16",
                   "the original's switch: True means --mixed_precision fp16")
        for action in parser._actions:  # still parsed, to be refused by name, or (the encoder's) to do nothing
            if action.dest in ("enc_model_type", "enc_model_path", "num_virtual_tokens", "lp_rank",
                               "compile_encoder", "encoder_graphs"):
                action.help = argparse.SUPPRESS
    return parser


def config_from_namespace(ns: argparse.Namespace, script: str) -> TrainConfig:
    """Typed, validated config (no file-system checks; see ``check_files``)."""
    method = "fft" if script == "fft" else ns.peft_method
    if ns.enc_model_type:  # checked even where the method ignores it: a typo should not pass silently
        get_encoder_spec(ns.enc_model_type)
    model = ModelArgs(
        method=method, task_name=ns.task_name, model_type=ns.model_type, model_path=ns.model_path,
        enc_model_type=ns.enc_model_type if method in ("lopa", "idpg") else None,
        enc_model_path=ns.enc_model_path, data_path=ns.data_path, mbpp_split=ns.mbpp_split,
        num_virtual_tokens=ns.num_virtual_tokens, lp_rank=ns.lp_rank, lora_dim=getattr(ns, "lora_dim", 16),
        lora_alpha=getattr(ns, "lora_alpha", 32), lora_dropout=getattr(ns, "lora_dropout", 0.1),
        encoder_dropout=getattr(ns, "encoder_dropout", True) if method in ("lopa", "idpg") else None, seed=ns.seed)
    mixed_precision = ns.mixed_precision
    if getattr(ns, "fp16", False):
        if mixed_precision not in ("auto", "fp16"):
            raise UserError(f"--fp16 True contradicts --mixed_precision {mixed_precision}; pass one of them")
        mixed_precision = "fp16"
    if method == "fft" and ns.model_dtype != "fp32":
        raise UserError("--model_dtype must be fp32 for full fine-tuning (fp32 master weights); "
                        "use --mixed_precision bf16 for speed")
    train = TrainArgs(
        num_epochs=ns.num_epochs, per_gpu_train_batch_size=ns.per_gpu_train_batch_size,
        gradient_accumulation_steps=ns.gradient_accumulation_steps,
        lr=ns.lr if ns.lr is not None else PAPER_LR[method], weight_decay=ns.weight_decay,
        lr_scheduler_type=ns.lr_scheduler_type, num_warmup_steps=ns.num_warmup_steps, warmup_ratio=ns.warmup_ratio,
        max_train_steps=ns.max_train_steps, max_grad_norm=ns.max_grad_norm, mixed_precision=mixed_precision,
        model_dtype=ns.model_dtype, gradient_checkpointing=ns.gradient_checkpointing, compile=ns.compile,
        compile_mode=ns.compile_mode, compile_encoder=ns.compile_encoder, encoder_graphs=ns.encoder_graphs,
        selective_logits=ns.selective_logits, fused_adamw=ns.fused_adamw, packing=ns.packing,
        pad_to_max_length=ns.pad_to_max_length, pad_to_multiple_of=ns.pad_to_multiple_of,
        group_by_length=ns.group_by_length,
        limit_train_examples=ns.limit_train_examples, max_length=ns.max_length, path_to_ds_config=ns.path_to_ds_config)
    save_every, save_total_limit, keep = ns.save_every, ns.save_total_limit, True
    if save_every is None and ns.resume_from is not None:  # the resumed run's own choice, not today's default
        save_every, save_total_limit, keep = _saved_checkpointing(ns.resume_from, save_total_limit)
    if save_every is None:  # a crash of a PEFT run loses at most an epoch; the checkpoint goes once final/ exists
        save_every, keep = ("0", True) if method == "fft" else ("1", False)
        if method != "fft" and save_total_limit is None:
            save_total_limit = 1
    if ns.keep_checkpoints is not None:
        keep = ns.keep_checkpoints
    output = OutputArgs(
        log_dir=ns.log_dir or _resume_log_dir(ns.resume_from) or default_log_dir(),
        save_every=SaveEvery.parse(save_every), save_total_limit=save_total_limit, keep_checkpoints=keep,
        resume_from=ns.resume_from, wandb_logging=ns.wandb_logging, project_name=ns.project_name,
        log_every=ns.log_every)
    return TrainConfig(script=script, model=model, train=train, output=output)


def _saved_checkpointing(resume_from: str, save_total_limit: int | None) -> tuple[str | None, int | None, bool]:
    """``(save_every, save_total_limit, keep_checkpoints)`` the run being resumed was started with (its checkpoint's
    config.json), where the command line does not say: a run started before the PEFT default changed (or with
    --save_every 50steps) keeps checkpointing as it did. ``(None, ...)`` when it cannot be read (checked later)."""
    from utils.checkpoint import find_checkpoint

    try:
        output = json.loads((find_checkpoint(resume_from) / "config.json").read_text(encoding="utf-8"))["output"]
        save_every = str(output["save_every"])
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None, save_total_limit, True
    limit = save_total_limit if save_total_limit is not None else output.get("save_total_limit")
    return save_every, limit, bool(output.get("keep_checkpoints", True))


def _resume_log_dir(resume_from: str | None) -> str | None:
    """A resumed run keeps writing to the run's own log_dir unless --log_dir says otherwise."""
    if resume_from is None:
        return None
    path = pathlib.Path(resume_from)
    if (path / "trainer_state.json").is_file() and path.parent.name == "checkpoints":
        return str(path.parent.parent)
    if path.name == "checkpoints" and (path / "latest").is_file():  # <log_dir>/checkpoints itself
        return str(path.parent)
    return str(path)



def parse_args(argv: list[str] | None, script: str) -> TrainConfig:
    """Parse and validate. Writes nothing; raises UserError (or exits 2 from argparse) on a bad value."""
    ns = build_parser(script).parse_args(argv)
    refuse_other_methods_flags(argv, script, ns.peft_method if script == "peft" else "fft")
    config = config_from_namespace(ns, script)
    check_files(config)
    return config


def refuse_other_methods_flags(argv: list[str] | None, script: str, method: str) -> None:
    """A flag only other methods read (--lp_rank for lora, say) did nothing, yet config.json recorded it as the
    run's; generate_preds.py refuses the same flags."""
    from utils.registry import METHOD_FLAGS

    parser = build_parser(script)
    for action in parser._actions:  # parsed again with no defaults: what the command line gave
        action.default, action.required = argparse.SUPPRESS, False
    given = vars(parser.parse_args(argv))
    for flag in sorted(METHOD_FLAGS.keys() & given.keys()):
        if method not in METHOD_FLAGS[flag]:
            raise UserError(f"--{flag} is for {'/'.join(METHOD_FLAGS[flag])}, not {method}; drop it")
