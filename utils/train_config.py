"""The typed configuration of a training run: what is tuned, how it is optimised, where results go.

Three dataclasses, each checking itself in ``__post_init__`` (litgpt style): ``ModelArgs`` (what is tuned, on
which data), ``TrainArgs`` (optimisation), ``OutputArgs`` (where results go, checkpoints, resume, logging), and
``TrainConfig`` holding the three. A bad value raises ``UserError`` naming the flag. The command line that
fills them is ``utils.train_args``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field

from utils.cli import check_model_args
from utils.errors import UserError
from utils.registry import PEFT_METHODS
from utils.tasks import get_task

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
PRECISIONS = ("auto", "no", "bf16", "fp16")
MODEL_DTYPES = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "default", "reduce-overhead")
GRAPHS_PAD_MULTIPLE = 64
"""The width multiple where the decoder layers compile with reduce-overhead (asked for, or chosen by ``--compile_mode
auto``) and ``--pad_to_multiple_of`` is not given: CUDA graphs record one graph per batch shape, so rows are rounded
to few widths (the H100 figures of docs/TRAINING.md used 64)."""


# ---------------------------------------------------------------------------------------------- save_every
@dataclass(frozen=True)
class SaveEvery:
    """Checkpoint frequency: ``every`` epochs or optimizer steps; ``every == 0`` saves only ``final/``."""

    every: int = 0
    unit: str = "epochs"

    @classmethod
    def parse(cls, text: str | int) -> "SaveEvery":
        match = re.fullmatch(r"\s*(-?\d+)\s*(epochs?|steps?)?\s*", str(text))
        if not match:
            raise UserError(f"--save_every {text!r}: expected N (epochs), Nepochs or Nsteps, e.g. 2 or 50steps")
        every, unit = int(match.group(1)), match.group(2) or "epochs"
        if every <= 0:  # the original's -1 (and 0) mean "only final/"
            return cls(0, "epochs")
        return cls(every, "steps" if unit.startswith("step") else "epochs")

    def __str__(self) -> str:
        return f"{self.every}{self.unit}" if self.every else "0"

    def due(self, *, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether a checkpoint is due after optimizer ``step`` or after completing ``epoch`` (1-based)."""
        if not self.every:
            return False
        if self.unit == "steps":
            return step is not None and step % self.every == 0
        return epoch is not None and epoch % self.every == 0


# ---------------------------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class ModelArgs:
    """What is tuned, and on which data."""

    method: str
    task_name: str
    model_type: str
    model_path: str | None = None
    enc_model_type: str | None = "codesage-small"
    enc_model_path: str | None = None
    data_path: str | None = None
    mbpp_split: str = "paper"
    num_virtual_tokens: int = 10
    lp_rank: int = 1
    lora_dim: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    encoder_dropout: bool | None = True
    """idpg/lopa: the frozen encoder's dropout acts in training, as the original's (``PooledEncoder``); None for
    the methods without an encoder."""
    seed: int = 9876

    def __post_init__(self):
        check_model_args(argparse.Namespace(**dataclasses.asdict(self)))
        get_task(self.task_name).max_lengths(self.num_virtual_tokens if self.method in ("pt", "lopa", "idpg") else 0)
        if self.method not in PEFT_METHODS + ("fft",):
            raise UserError(f"unknown method {self.method!r}; choose one of: {', '.join(PEFT_METHODS)} (or fft)")
        _at_least("lora_dim", self.lora_dim, 1)
        _positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.seed < 2**32:  # numpy's seeding (accelerate's set_seed) takes nothing else
            raise UserError(f"--seed must be in [0, 2**32), got {self.seed}")

    @property
    def uses_encoder(self) -> bool:
        return self.method in ("lopa", "idpg")


@dataclass(frozen=True)
class TrainArgs:
    """Optimisation. Defaults are the paper's PEFT runs (spec §10.5); the FFT script overrides a few."""

    num_epochs: int = 10
    per_gpu_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    num_warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_train_steps: int | None = None
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    model_dtype: str = "fp32"
    gradient_checkpointing: bool = False
    compile: str = "auto"
    compile_mode: str = "auto"
    """``torch.compile`` mode of the decoder layers; ``reduce-overhead`` replays them from CUDA graphs; ``auto``: that
    where it was run on a GPU, else the default mode (``resolve_compile_mode``)."""
    compile_encoder: bool = True
    """With ``compile``, LOPA's / IDPG's frozen encoder is compiled layer by layer too."""
    encoder_graphs: bool = False
    """LOPA's / IDPG's frozen encoder replayed from CUDA graphs (``utils/encoder_graphs.py``; CUDA only)."""
    selective_logits: bool = True
    fused_adamw: bool = True
    packing: bool = True
    """Padding-free rows where cheaper (``custom_peft.packing``); off under ``pad_to_max_length``."""
    pad_to_max_length: bool = False
    pad_to_multiple_of: int | None = None
    """Round each batch's width (padded rows, and packed ones) up to a multiple of this; None: 64 under
    reduce-overhead (asked for or chosen by ``auto``), else off; 0 or 1: off (``pad_multiple``)."""
    group_by_length: bool = False
    limit_train_examples: int | None = None
    max_length: int | None = None
    path_to_ds_config: str | None = None

    def __post_init__(self):
        for name in ("num_epochs", "per_gpu_train_batch_size", "gradient_accumulation_steps"):
            _at_least(name, getattr(self, name), 1)
        for name in ("max_train_steps", "limit_train_examples", "max_length"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        _positive("lr", self.lr)
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:  # written so that NaN fails too
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay"):  # inf makes every trained weight NaN, logged as loss 0.0
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name} must be a finite number, got {getattr(self, name)}")
        _at_least("num_warmup_steps", self.num_warmup_steps, 0)
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        _choice("compile", self.compile, ("auto", "on", "off"))
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        self._check_cuda_graphs()
        if self.lr_scheduler_type == "constant" and (self.num_warmup_steps or self.warmup_ratio):
            raise UserError("--lr_scheduler_type constant ignores warmup; use constant_with_warmup, "
                            "or drop --num_warmup_steps/--warmup_ratio")

    def _check_cuda_graphs(self) -> None:
        """Combinations in which --compile_mode reduce-overhead or --pad_to_multiple_of would do nothing, or what
        was never tried: refused rather than recorded in config.json as if they had acted."""
        if self.pad_to_multiple_of is not None:
            _at_least("pad_to_multiple_of", self.pad_to_multiple_of, 0)
        if self.pad_to_max_length and (self.pad_to_multiple_of or 0) > 1:
            raise UserError(f"--pad_to_multiple_of {self.pad_to_multiple_of} does nothing under --pad_to_max_length "
                            f"(every row already has the task's one length, and packing is off); drop one of them")
        if self.compile_mode != "reduce-overhead":  # auto falls back to the default mode where these refuse
            return
        if self.compile == "off":
            raise UserError(f"--compile_mode {self.compile_mode} is a mode of compiling the decoder layers, which "
                            f"--compile off turns off; drop one of them")
        if self.path_to_ds_config is not None:
            raise UserError(deepspeed_graphs_message("--path_to_ds_config"))
        if self.gradient_checkpointing:  # pytorch#154306, open in torch 2.11-2.13
            raise UserError(f"--compile_mode {self.compile_mode} with --gradient_checkpointing: torch's CUDA graphs "
                            f"fail inside non-reentrant activation checkpoints (\"graph recording observed an input "
                            f"tensor deallocate\", pytorch issue 154306), at the first new batch shape; drop one of "
                            f"them")


@dataclass(frozen=True)
class OutputArgs:
    """Where results go, when checkpoints are written, what a run resumes from, how it reports."""

    log_dir: str
    save_every: SaveEvery = field(default_factory=SaveEvery)
    save_total_limit: int | None = None
    keep_checkpoints: bool = True
    """False (PEFT's default --save_every): the checkpoints only protect the run against a crash; the last step's
    is not written (final/ follows at once) and checkpoints/ is removed once final/ is in place."""
    resume_from: str | None = None
    wandb_logging: bool = False
    project_name: str = "PromptTuningModel"
    log_every: int = 1

    def __post_init__(self):
        _at_least("log_every", self.log_every, 1)
        if self.save_total_limit is not None:
            _at_least("save_total_limit", self.save_total_limit, 1)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; ``to_dict`` is what config.json records."""

    script: str
    model: ModelArgs
    train: TrainArgs
    output: OutputArgs

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["output"]["save_every"] = str(self.output.save_every)
        return out


def deepspeed_graphs_message(source: str) -> str:
    """Why --compile_mode reduce-overhead is refused under DeepSpeed (``source``: what turned DeepSpeed on)."""
    return (f"--compile_mode reduce-overhead is not supported under DeepSpeed ({source}): its CUDA graphs have not "
            f"been tried with ZeRO's gradient hooks and buckets (and --compile auto does not compile there at all); "
            f"drop --compile_mode, or train without DeepSpeed")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise UserError(f"--{name} must be >= {low}, got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"--{name} must be > 0, got {value}")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"--{name} {value!r}: choose one of: {', '.join(choices)}")


GRAPHS_AUTO_METHODS = ("pt", "lora", "lopa", "idpg")
"""The methods ``--compile_mode auto`` gives CUDA graphs: the PEFT methods. On an H100 PT's decoder layers ran under
them through the trainer, and LoRA's in the benchmark, with the default mode's losses (BENCHMARKS.md, sessions
19-20); LOPA's and IDPG's decoder input is a soft prompt as PT's (not yet run on a GPU). Not FFT, whose every weight
would be a graph's input and output (never run)."""


def resolve_compile_mode(train: TrainArgs, method: str, device_type: str, num_processes: int, deepspeed: bool,
                         encoder_graphs: bool) -> tuple[str, str | None]:
    """The compiled decoder layers' mode, and why ``--compile_mode auto`` did not choose reduce-overhead (None when
    it did, or when a mode was named). Auto chooses CUDA graphs where they were tried: a PEFT method in one process
    on CUDA, without DeepSpeed, activation checkpoints (pytorch#154306) or the encoder's own CUDA graphs."""
    if train.compile_mode != "auto":
        return train.compile_mode, None
    reasons = [why for why, ruled_out in (
        (f"the device is {device_type}, not CUDA", device_type != "cuda"),
        (f"{method} has not been run with them", method not in GRAPHS_AUTO_METHODS),
        (f"{num_processes} processes", num_processes > 1),
        ("DeepSpeed", deepspeed),
        ("--gradient_checkpointing", train.gradient_checkpointing),
        ("--encoder_graphs", encoder_graphs)) if ruled_out]
    return ("default", "; ".join(reasons)) if reasons else ("reduce-overhead", None)


def pad_multiple(train: TrainArgs, compile_mode: str | None) -> int | None:
    """The width multiple batches are rounded up to, or None: ``--pad_to_multiple_of`` when given (0 and 1: none),
    else 64 where the decoder layers compile with reduce-overhead (CUDA graphs record one graph per batch shape).
    None under ``--pad_to_max_length``, whose rows all have one length already (an explicit multiple is refused)."""
    multiple = train.pad_to_multiple_of
    if multiple is None:
        multiple = GRAPHS_PAD_MULTIPLE if compile_mode == "reduce-overhead" else None
    return multiple if multiple and multiple > 1 and not train.pad_to_max_length else None
