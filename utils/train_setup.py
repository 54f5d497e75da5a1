"""What the training loop runs on: the Accelerator (one process, DDP or DeepSpeed), DeepSpeed's JSON filled
in, the optimizer and learning-rate schedule, and the step plan.

Step counts come from the dataloader *after* accelerate shards it, and the scheduler is stepped once per
optimizer step (``step_scheduler_with_optimizer=False``): accelerate's default steps it once per process,
which only fits a schedule sized before sharding.
"""
from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass

import torch

from utils.data import read_json_object
from utils.errors import UserError
from utils.train_config import TrainArgs, TrainConfig, deepspeed_graphs_message


@dataclass(frozen=True)
class Plan:
    """Step counts, from the dataloader as sharded across processes."""

    batches_per_epoch: int
    """Micro-batches per epoch on each process."""
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup_steps: int
    total_batch_size: int
    """Examples per optimizer step, all processes together."""


def make_plan(train: TrainArgs, batches_per_epoch: int, num_processes: int) -> Plan:
    steps_per_epoch = math.ceil(batches_per_epoch / train.gradient_accumulation_steps)
    total = train.max_train_steps or train.num_epochs * steps_per_epoch
    # a ratio's warmup leaves at least one step at a rate above 0: a one-step run (an FFT smoke test) warmed up over
    # its only step trained at lr 0 and left the weights as they were (HF's Trainer takes the ceil alone)
    warmup = train.num_warmup_steps or min(math.ceil(train.warmup_ratio * total), total - 1)
    if train.num_warmup_steps >= total:
        raise UserError(f"--num_warmup_steps {warmup} is not below the run's {total} optimizer steps, so the "
                        f"learning rate would never reach --lr; lower it (or use --warmup_ratio)")
    return Plan(batches_per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch), warmup,
                train.per_gpu_train_batch_size * train.gradient_accumulation_steps * num_processes)


def examples_per_epoch(num_examples: int, batch_size: int, num_processes: int) -> int:
    """Examples an epoch's micro-batches hold, all processes together. One process takes the sampler's permutation
    as it is (its last micro-batch may be short); several take its micro-batches round-robin, and accelerate
    (``even_batches``) fills the last round up with the epoch's first examples, so that each process gets as many
    full micro-batches: how many are repeated depends on the micro-batch size."""
    if num_processes == 1:
        return num_examples
    return num_processes * batch_size * math.ceil(num_examples / (num_processes * batch_size))


def same_steps(num_examples: int, num_processes: int, split: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether (micro-batch, accumulation steps) ``other`` trains on the same examples as ``split`` in every
    optimizer step. All processes' micro-batches of step k hold the examples k·b·a·N to (k+1)·b·a·N of one sequence
    (the epoch's permutation, then the repeats that even it out), and the steps per epoch are ⌈examples / (N·b·a)⌉:
    with b·a unchanged, only the repeats can differ, and with them the last step of each epoch (checked against
    accelerate's sharding in tests/test_training_units.py)."""
    (b, a), (other_b, other_a) = split, other
    return b * a == other_b * other_a and (examples_per_epoch(num_examples, b, num_processes)
                                           == examples_per_epoch(num_examples, other_b, num_processes))


def smaller_micro_batches(num_examples: int, num_processes: int, split: tuple[int, int]) -> list[tuple[int, int]]:
    """The splits into smaller micro-batches that take ``split``'s steps (``same_steps``), the largest first."""
    b, a = split
    return [(c, b * a // c) for c in range(b - 1, 0, -1)
            if b * a % c == 0 and same_steps(num_examples, num_processes, split, (c, b * a // c))]


def batch_split_refusal(saved: tuple[int, int], split: tuple[int, int], num_examples: int, num_processes: int, *,
                        group_by_length: bool) -> str | None:
    """Why a resume of a checkpoint taken with (micro-batch, accumulation steps) ``saved`` cannot go on with
    ``split`` (None: it can, or nothing changed). A checkpoint is taken between optimizer steps and an update
    depends only on the examples of its step (its loss is the mean over all their supervised tokens), so another
    split of the same steps goes on as the run would have; dropout draws its masks per micro-batch, so that is equal
    in distribution, not bit for bit. DeepSpeed's checkpoint holds no batch shape (its ZeRO partitions follow the
    process count, which a resume keeps): ZeRO-2 and ZeRO-3 resumes with another split were tested."""
    if saved == split:
        return None
    what = (f"the checkpoint's micro-batch x accumulation steps is {saved[0]} x {saved[1]}, this run's {split[0]} x "
            f"{split[1]}")
    if saved[0] * saved[1] != split[0] * split[1]:
        return (f"{what}: a resume may change them only where the product (the examples per step on each process, "
                f"{saved[0] * saved[1]}) stays the same")
    if group_by_length:
        return f"{what}: --group_by_length groups the examples by micro-batch, so another one changes their order"
    if not same_steps(num_examples, num_processes, saved, split):
        keep = [f"{b} x {a}" for b, a in smaller_micro_batches(num_examples, num_processes, saved)]
        return (f"{what}: with {num_processes} processes and {num_examples} examples accelerate repeats examples to "
                f"give each process as many micro-batches, "
                f"{examples_per_epoch(num_examples, saved[0], num_processes) - num_examples} with micro-batches of "
                f"{saved[0]}, {examples_per_epoch(num_examples, split[0], num_processes) - num_examples} with "
                f"{split[0]}, so the last step of each epoch would train on other examples"
                + (f" ({' or '.join(keep)} would not)" if keep else ""))
    return None


def check_batch_split(where, saved: tuple[int, int], split: tuple[int, int], num_examples: int,
                      num_processes: int, *, group_by_length: bool) -> None:
    """Refuse, naming the checkpoint ``where`` and the split that resumes it, what ``batch_split_refusal`` refuses."""
    refusal = batch_split_refusal(saved, split, num_examples, num_processes, group_by_length=group_by_length)
    if refusal:
        raise UserError(f"{where}: {refusal}; pass --per_gpu_train_batch_size {saved[0]} --gradient_accumulation_steps "
                        f"{saved[1]} to resume, or start a new run")


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a training step holds on one GPU before any activation: the model's weights, the trained tensors'
    gradients and AdamW's two states per trained tensor (torch's AdamW keeps them in the tensor's dtype)."""

    weights: int
    gradients: int
    adamw_states: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adamw_states

    @classmethod
    def of(cls, model: torch.nn.Module) -> MemoryNeed:
        weights = trained = 0
        for p in model.parameters():
            size = p.numel() * p.element_size()
            weights += size
            trained += size if p.requires_grad else 0
        return cls(weights, trained, 2 * trained)


def check_fits_gpu(need: MemoryNeed, free: int, method: str, model_type: str, model_dtype: str) -> str | None:
    """Refuse a run whose weights, gradients and AdamW states alone exceed the GPU's ``free`` bytes: it would run out
    of memory at its first step, after the model had loaded and moved. Returns a warning when they leave under a
    tenth of the memory for the activations, else None. For one process per GPU without DeepSpeed (ZeRO partitions
    and offloads)."""
    parts = f"weights {_size(need.weights)}"
    if need.gradients:
        parts += f", gradients {_size(need.gradients)}, AdamW states {_size(need.adamw_states)}"
    what = f"{'full fine-tuning' if method == 'fft' else method} of {model_type} needs {_size(need.total)} " \
           f"before activations ({parts})"
    if method == "fft":
        way_out = ("ZeRO-3 with CPU offload keeps the weights and AdamW states in CPU memory: accelerate launch "
                   "--config_file config_files/config_ds_zero3_fft.yaml --num_processes 1 tune_fft_baseline.py ... "
                   "(docs/TRAINING.md)")
    elif model_dtype == "fp32":
        way_out = "--model_dtype bf16 halves the frozen weights (the trained tensors stay fp32)"
    else:
        way_out = "use a GPU with more memory, or a smaller --model_type"
    if need.total > free:
        raise UserError(f"{what}, more than the {_size(free)} free on this GPU: it would run out of memory at its "
                        f"first step; {way_out}")
    if need.total > 0.9 * free:
        return (f"{what}, which leaves {_size(free - need.total)} of the GPU's {_size(free)} free for activations: "
                f"an out-of-memory error is likely; {way_out}")
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:.1f} MiB"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norm weights (every tensor of fewer than 2 dims)."""
    from utils.models import full_shape

    params = [p for p in model.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    # the full shape: a ZeRO-3 shard is 1-D, which would put every weight in the no-decay group
    decay = [p for p in params if len(full_shape(p)) >= 2]
    no_decay = [p for p in params if len(full_shape(p)) < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, which the first ``Accelerator()`` fixes (mixed precision above all),
    so that the next one in this process starts as in a new process: run_experiment's in-process stages, tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _resolve_mixed_precision(choice: str, deepspeed: bool, ds_config: dict | None = None) -> str | None:
    """None lets accelerate read the launcher's setting (or the DeepSpeed JSON decide). ``ds_config``: the DeepSpeed
    JSON in use, whose literal ``fp16``/``bf16`` ``enabled: true`` is checked as the command line's would be."""
    # V100/T4 answer True by default: torch emulates bf16 arithmetic there, in fp32 and slowly
    native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    enabled = {kind for kind in ("fp16", "bf16")
               if isinstance((ds_config or {}).get(kind), dict) and ds_config[kind].get("enabled") is True}
    asked = [(f"--mixed_precision {choice}", choice)] if choice != "auto" else []
    if choice == "auto" and launcher in ("fp16", "bf16"):
        asked.append((f"the accelerate config's mixed_precision: {launcher}", launcher))
    asked += [(f"the DeepSpeed config's {kind}.enabled: true", kind) for kind in sorted(enabled)]
    for source, kind in asked:
        if kind == "bf16" and torch.cuda.is_available() and not native_bf16:
            raise UserError(f"{source}: this GPU ({torch.cuda.get_device_name()}) has no native bfloat16 (torch "
                            f"would only emulate it); pass --mixed_precision fp16 or no (run_experiment.py: "
                            f"--set mixed_precision=no), or use a config without bf16")
        if kind == "fp16" and not torch.cuda.is_available():
            raise UserError(f"{source}: fp16 needs a CUDA GPU; on the CPU use --mixed_precision bf16 or no, and a "
                            f"DeepSpeed config whose fp16.enabled is \"auto\" or false "
                            f"(config_files/zero_stage2_nofp16_config.json)")
    if choice != "auto":
        return choice
    if launcher or deepspeed:
        return None
    return "bf16" if native_bf16 else "no"


def _single_process_env() -> None:
    """DeepSpeed needs a process group even for one process started with plain ``python``."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def venv_extension_cache() -> None:
    """Let torch's JIT extensions (DeepSpeed's CPU Adam and shared-memory collectives) built once, by ``make install``,
    be found by every later run instead of rebuilt (3-7 minutes on 2 cores each time). Inside a venv:

    * its own ``ninja`` (pip's, which deepspeed requires) comes first on PATH. torch runs the first ``ninja`` on PATH,
      and two versions (here the venv's 1.13 and the system's 1.11) do not read each other's build log alike: each
      switch rebuilt everything ("command line changed"). ``make install`` and ``make test`` run the venv's Python
      without activating it; launchers and activated shells had the venv's ninja.
    * the build cache is in the venv, unless ``TORCH_EXTENSIONS_DIR`` says where: torch's default, one ``~/.cache``
      directory for every venv, got each other venv's builds (their flags name its own paths), and a build killed
      in one left a lock that stalled the others.

    Outside a venv (a Docker image's Python), or in one that is not writable, torch's defaults stay."""
    if sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *path])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, DeepSpeedPlugin, DistributedDataParallelKwargs,
                                  ProjectConfiguration)

    venv_extension_cache()  # before DeepSpeed loads any op
    train = config.train
    env_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    env_ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if env_ds and env_ds_file and env_ds_file != "none" and not os.path.isfile(env_ds_file):
        raise UserError(f"the accelerate config names deepspeed_config_file {env_ds_file}, which does not exist "
                        f"(relative paths are read from {os.getcwd()}); run from the project root or fix the YAML")
    if env_ds and train.compile_mode == "reduce-overhead":  # --path_to_ds_config: refused in parsing already
        raise UserError(deepspeed_graphs_message("the accelerate config's distributed_type: DEEPSPEED"))
    ds_file = train.path_to_ds_config or (env_ds_file if env_ds and env_ds_file != "none" else None)
    ds_config = read_json_object(ds_file, "the DeepSpeed config") if ds_file else None
    mixed_precision = _resolve_mixed_precision(train.mixed_precision, bool(train.path_to_ds_config) or env_ds,
                                               ds_config)
    plugin = None
    if train.path_to_ds_config:
        _single_process_env()
        # zero3_init_flag as the original's; transformers still builds a ZeRO-3 model partitioned (docs/TRAINING.md)
        plugin = DeepSpeedPlugin(hf_ds_config=train.path_to_ds_config, zero3_init_flag=False)
    return Accelerator(
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="wandb" if config.output.wandb_logging else None,
        project_config=ProjectConfiguration(project_dir=config.output.log_dir, logging_dir=config.output.log_dir),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, by us (not N times per step)
        deepspeed_plugin=plugin,
        # batches come pinned on a GPU (utils/training.py): their copy need not wait for the GPU's queued work
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def configure_deepspeed(accelerator, config: TrainConfig, hidden_size: int) -> dict:
    """Fill the DeepSpeed JSON's ``auto`` values the way this loop runs; reject values that contradict it."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    train = config.train
    # a number in the JSON must agree with the run (config.json records the command line's values)
    for key, ours in (("gradient_accumulation_steps", train.gradient_accumulation_steps),
                      ("train_micro_batch_size_per_gpu", train.per_gpu_train_batch_size),
                      ("train_batch_size", train.per_gpu_train_batch_size * train.gradient_accumulation_steps
                       * accelerator.num_processes),
                      ("gradient_clipping", train.max_grad_norm)):
        if ds.get(key, "auto") not in ("auto", ours):
            raise UserError(f"the DeepSpeed config sets {key}={ds[key]} but this run uses {ours}; set it to "
                            f'"auto" in the JSON (the command line decides)')
        ds[key] = ours
    zero = ds["zero_optimization"]
    if zero.get("stage", 0) == 3 and config.model.method != "fft":
        raise UserError("ZeRO stage 3 partitions the frozen model and the adapter; use ZeRO-2 for PEFT methods "
                        "(config_files/config_ds_zero_stage2_no_fp16.yaml)")
    if zero.get("stage", 0) == 3:  # final/ needs the whole model gathered (accelerate's get_state_dict)
        gather = "stage3_gather_16bit_weights_on_model_save"
        if gather not in zero:  # DeepSpeed's own default, False, would fail only after training
            zero[gather] = True
        elif zero[gather] is not True:  # accelerate has filled "auto" from zero3_save_16bit_model by now
            source = train.path_to_ds_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "accelerate config")
            raise UserError(f"{source}: zero_optimization.{gather} resolves to {zero[gather]}, but full fine-tuning "
                            f"under ZeRO-3 gathers the weights to write final/; set it to true in the JSON (or "
                            f"zero3_save_16bit_model: true in the accelerate YAML)")
    # accelerate would read these from model.config, which the wrapped model does not have
    fills = {"zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
             "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in fills.items():  # only where the JSON says "auto"
        plugin.fill_match(key, must_match=False, **{key: value})
    accelerator.gradient_accumulation_steps = train.gradient_accumulation_steps
    return ds


def optimizer_step(accelerator, optimizer) -> bool:
    """Step accelerate's wrapped ``optimizer``; True when the step was skipped (an fp16 overflow).

    A fused AdamW unscales in its own kernel: its ``step()`` runs and skips the update there, so accelerate's
    ``step_was_skipped`` stays False (accelerate issue #4242); the loss scale backing off counts as a skip too."""
    scaler = accelerator.scaler
    scale = scaler.get_scale() if scaler is not None else None
    optimizer.step()
    return optimizer.step_was_skipped or (scale is not None and scaler.get_scale() < scale)


def make_optimizer_and_scheduler(model, train: TrainArgs, plan: Plan, accelerator, ds_config: dict | None):
    """DeepSpeed's optimizer (and scheduler) when its JSON has those blocks, else torch AdamW + a transformers
    schedule. Without a DeepSpeed ``scheduler`` block the transformers schedule is used in every case.

    Returns ``(optimizer, scheduler, schedule name)``."""
    from transformers import get_scheduler

    def schedule(optimizer):
        return get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=plan.warmup_steps,
                             num_training_steps=plan.total_steps)

    groups = param_groups(model, train.weight_decay)
    ds_config = ds_config or {}
    if "optimizer" in ds_config:
        from accelerate.utils import DummyOptim, DummyScheduler  # exported only where deepspeed is installed

        optimizer = DummyOptim(groups, lr=train.lr, weight_decay=train.weight_decay)
        if "scheduler" in ds_config:  # DeepSpeed's own scheduler; accelerate divides this total by N
            name = "deepspeed:" + ds_config["scheduler"].get("type", "?")
            return optimizer, DummyScheduler(optimizer, total_num_steps=plan.total_steps * accelerator.num_processes,
                                             warmup_num_steps=plan.warmup_steps), name
        return optimizer, DummyScheduler(optimizer, lr_scheduler_callable=schedule), train.lr_scheduler_type
    if "scheduler" in ds_config:
        raise UserError("the DeepSpeed config has a scheduler block but no optimizer block; remove the scheduler "
                        "block (--lr_scheduler_type sets the schedule) or add an optimizer block")
    fused = True if train.fused_adamw and accelerator.device.type == "cuda" else None  # None: torch's default
    optimizer = torch.optim.AdamW(groups, lr=train.lr, fused=fused)
    return optimizer, schedule(optimizer), train.lr_scheduler_type
