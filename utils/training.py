"""The one training loop of both scripts, on accelerate: one process, DDP, or DeepSpeed.

Order of work, and why:
1. the Accelerator first: the process count sizes the schedule, and DeepSpeed must exist before the model;
2. data, and its dataloader sharded by ``accelerator.prepare``;
3. the schedule sized from the *sharded* dataloader (optimizer steps per process) — the original sized it
   before sharding;
4. model, optimizer and scheduler prepared; then resume; then the loop.

Every process sees the same seeded permutation of the data (``EpochSampler``) and accelerate gives process p
the batches p, p+N, …, so N processes with batch b train on exactly the batches of one process with batch N·b.
The loss of an optimizer step is the mean over all its supervised tokens (every micro-batch, every process),
so the gradient is the same for any split into processes and accumulation steps. The original averaged
per-micro-batch means instead, which weighs tokens by how the batch was split.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import shutil
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader

from utils import fast_paths  # by module: tests swap its compile functions
from utils.batching import Collator, EpochSampler, LengthGroupedSampler, TaskDataset, shorten, supervised_tokens
from utils.checkpoint import (CHECKPOINTS_DIR, CONFIG_FILE, TrainerState, continue_hint, find_checkpoint,
                              has_resumable_checkpoint, load_checkpoint, read_resume_state, resume_hint,
                              save_checkpoint, set_rng_state)
from utils.cli import make_log_dir
from utils.data import default_data_path, load_task_split, records_digest
from utils.errors import HeldStop, UserError, hold_stop_signals, on_interrupt
from utils.fileio import (atomic_write_text, lock_directory, naming_full_disk, open_file_modes,
                          unfinished_directory)
from utils.tasks import get_task
from utils.train_config import TrainConfig, pad_multiple, resolve_compile_mode
from utils.train_logging import LOSS_PLOT, MetricsFile, ProgressBar, flatten, gpu_memory, plot_loss, setup_logging
from utils.train_setup import (MemoryNeed, batch_split_refusal, check_batch_split, check_fits_gpu, configure_deepspeed,
                               make_accelerator, make_optimizer_and_scheduler, make_plan, optimizer_step,
                               smaller_micro_batches)


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _QueuedStep:
    """An optimizer step queued on the device, its numbers not yet read back."""

    step: int
    epoch: int
    lr: float
    numbers: torch.Tensor
    """On the device: the summed loss, the supervised and the attended token counts, how many processes held a stop
    signal (``Trainer._stop_here``), and the gradient norm if the step measured one as a tensor."""
    grad_norm: float | None
    """A gradient norm DeepSpeed gave as a number."""
    queued_at: float
    """``time.perf_counter()`` once queued: on the CPU, where each op runs as it is queued, the step ends there."""


@dataclass
class TrainResult:
    log_dir: pathlib.Path
    final_dir: pathlib.Path
    global_step: int
    epoch_losses: list[float] = field(default_factory=list)
    """Mean step loss of each epoch finished in this session (the whole epoch, even if it began before a resume)."""
    is_main_process: bool = True
    """The scripts print their closing line from this process only (once per run, not once per GPU)."""


def _broadcast_str(accelerator, value: str) -> str:
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0] if accelerator.num_processes > 1 else value


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training ``config`` describes; writes everything under its log_dir."""
    on_interrupt("stopped while the model and data loaded, before the run wrote anything: rerun the same command")
    trainer = Trainer(config)
    if trainer.accelerator.is_main_process:
        on_interrupt(lambda: continue_hint(trainer.log_dir) if trainer.final_dir is None else (
            f"the training had finished: {trainer.final_dir} holds its weights (nothing to rerun)"))
    try:
        # naming_full_disk: the appends and the config; recompile_room: the compiled layers keep every version
        with naming_full_disk(trainer.log_dir, lambda: resume_hint(trainer.log_dir)), \
                fast_paths.recompile_room(fast_paths.TRAIN_RECOMPILE_LIMIT):
            return trainer.fit()
    finally:
        if trainer._lock is not None:
            trainer._lock.close()  # a later run in this process may write here again


def _main_process_first_unless_collective(accelerator):
    """Main process first (downloads happen once), except where building the model is collective: under ZeRO-3
    every parameter is broadcast as it is made (``deepspeed.zero.Init``), so a rank waiting at the barrier while
    the main process builds would hang both."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if accelerator.num_processes > 1 and is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()  # concurrent downloads are safe: the hub cache locks each file
    return accelerator.main_process_first()


class Trainer:
    def __init__(self, config: TrainConfig):
        acc = self.accelerator = make_accelerator(config)
        self.ds = acc.distributed_type == "DEEPSPEED"
        self.resume_dir = self.state = None
        self._held = HeldStop()  # the Ctrl-C or SIGTERM the loop holds (fit)
        self._stop_agreed = False  # whether a step's numbers said that a process of the run held one
        self._trained = None  # the trained tensors, listed on first use (_allocate_grads)
        self.split = (config.train.per_gpu_train_batch_size, config.train.gradient_accumulation_steps)
        self.saved_split = self.split  # the checkpoint's: its batch_in_epoch counts micro-batches of its size
        self.final_dir = None  # once final/ is written: a stop after it loses nothing (its checkpoints may be gone)
        if config.output.resume_from:
            self.resume_dir = find_checkpoint(config.output.resume_from)
            read_resume_state(self.resume_dir, acc.num_processes)
            saved = json.loads((self.resume_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("train", {})
            self.saved_split = (saved.get("per_gpu_train_batch_size", self.split[0]),
                                saved.get("gradient_accumulation_steps", self.split[1]))
        self.log_dir = pathlib.Path(_broadcast_str(acc, config.output.log_dir))  # rank 0's timestamp everywhere
        self.config = config
        self._build()  # before the log_dir exists: a model or data that fails to load leaves nothing behind
        self._lock = None
        if acc.is_main_process:
            self.log_dir = make_log_dir(self.log_dir)  # another -N when a run started in the same second took it
            self._lock = lock_directory(self.log_dir, "--log_dir", "training run")  # held until the process ends
        self.log_dir = pathlib.Path(_broadcast_str(acc, str(self.log_dir)))
        if self.log_dir != pathlib.Path(config.output.log_dir):  # config.json records the directory it is in
            self.resolved["output"]["log_dir"] = str(self.log_dir)
        acc.wait_for_everyone()
        self.log = setup_logging(self.log_dir, acc.is_main_process)
        self.metrics = MetricsFile(self.log_dir, acc.is_main_process)

    # ------------------------------------------------------------------------------------------ setup
    def _build(self) -> None:
        from accelerate.utils import set_seed

        from custom_peft import build_model
        from utils.models import check_fits_context, enable_activation_checkpointing, numel

        acc, cfg, m, t = self.accelerator, self.config, self.config.model, self.config.train
        set_seed(m.seed)  # python, numpy, torch: dropout draws from here (the model's init has its own seed)
        self.has_prompt = m.method in ("pt", "lopa", "idpg")
        with _main_process_first_unless_collective(acc):  # downloads (if any) happen once
            model, self.tokenizer = build_model(
                m.method, m.model_type, num_virtual_tokens=m.num_virtual_tokens, lp_rank=m.lp_rank,
                enc_model_type=m.enc_model_type, dtype=t.model_dtype, model_path=m.model_path,
                enc_model_path=m.enc_model_path, seed=m.seed, lora_r=m.lora_dim, lora_alpha=m.lora_alpha,
                lora_dropout=m.lora_dropout)
            task = get_task(m.task_name)
            records = load_task_split(m.task_name, "train", m.data_path or default_data_path(m.task_name),
                                      m.mbpp_split, limit=t.limit_train_examples)
        self.memory_warning = None
        if acc.device.type == "cuda" and not self.ds and acc.num_processes == 1:  # several: one rank alone would stop
            self.memory_warning = check_fits_gpu(MemoryNeed.of(model), torch.cuda.mem_get_info(acc.device)[0],
                                                 m.method, m.model_type, t.model_dtype)
        enc_tok = model.enc_tokenizer
        self.records = records
        self.dataset = TaskDataset(task, records, self.tokenizer, enc_tok,
                                   num_virtual_tokens=m.num_virtual_tokens if self.has_prompt else 0)
        max_length = task.max_lengths(m.num_virtual_tokens if self.has_prompt else 0)[1]
        if t.max_length is not None:
            max_length = min(max_length, t.max_length)
            self.dataset.examples = [shorten(e, max_length) for e in self.dataset.examples]
        if self.has_prompt:
            check_fits_context(m.num_virtual_tokens + max_length, model.lm.config,
                               f"--num_virtual_tokens {m.num_virtual_tokens} before {m.task_name} examples of up to "
                               f"{max_length} tokens", "use a smaller --num_virtual_tokens, or cut the examples "
                               "shorter with --max_length")
        if m.uses_encoder:
            model.prompt.encoder.dropout_in_training = m.encoder_dropout
        if t.gradient_checkpointing:
            enable_activation_checkpointing(model.lm)
        model.selective_logits = t.selective_logits
        packing = t.packing and not t.pad_to_max_length  # fixed-length rows are asked for as the original's
        self.packing_refusal = model.packing_refusal if packing else None
        model.packing = self.packing = packing and self.packing_refusal is None
        self.compiled = t.compile == "on" or (t.compile == "auto" and acc.device.type == "cuda" and not self.ds)
        self.encoder_graphs = bool(t.encoder_graphs and m.uses_encoder and acc.device.type == "cuda" and not self.ds
                                   and model.prompt.encoder.use_graphs())
        self.compile_mode, self.no_graphs_reason = (
            resolve_compile_mode(t, m.method, acc.device.type, acc.num_processes, self.ds, self.encoder_graphs)
            if self.compiled else (None, None))
        # reduce-overhead: a new step before each micro-batch, so that its graphs may reuse the last one's memory;
        # with accumulation the gradients then live outside the graphs' memory (_queue_step)
        self.graph_steps = self.compile_mode == "reduce-overhead"
        self.cuda_graphs = self.graph_steps and acc.device.type == "cuda"  # torch records none on the CPU
        self.pad_multiple = pad_multiple(t, self.compile_mode)
        model.packed_width_multiple = self.pad_multiple
        self.compiled_encoder = self.compiled and m.uses_encoder and t.compile_encoder and not self.encoder_graphs
        if self.compiled:  # the default mode is passed as no mode at all, as before the option existed
            fast_paths.compile_layers(model.lm, **({"mode": self.compile_mode} if self.graph_steps else {}))
            if self.compiled_encoder:
                fast_paths.compile_encoder_layers(model.prompt.encoder.backbone)
        self.compiled_heads = self.compiled and m.uses_encoder and fast_paths.compile_prompt_heads(model.prompt)
        self.sampler = (LengthGroupedSampler(self.dataset.lengths(), t.per_gpu_train_batch_size * acc.num_processes,
                                             seed=m.seed) if t.group_by_length
                        else EpochSampler(len(self.dataset), m.seed))
        pad_to = max_length if t.pad_to_max_length else None
        collator = Collator(self.tokenizer.pad_token_id, enc_tok.pad_token_id if enc_tok else None,
                            padding_side="right", pad_to=pad_to, pad_to_multiple_of=self.pad_multiple,
                            prefix_tokens=m.num_virtual_tokens if self.has_prompt else 0, host_copy=True)
        # pinned batches: accelerate copies them to the GPU without waiting for it (make_accelerator's non_blocking)
        loader = DataLoader(self.dataset, batch_size=t.per_gpu_train_batch_size, sampler=self.sampler,
                            collate_fn=collator, num_workers=0, generator=torch.Generator().manual_seed(m.seed),
                            pin_memory=acc.device.type == "cuda")
        self.dataloader = acc.prepare(loader)
        self.plan = make_plan(t, len(self.dataloader), acc.num_processes)  # after sharding
        # parsing judged from the checkpoint's record; this is the data and processes at hand
        check_batch_split(self.resume_dir, self.saved_split, self.split, len(self.dataset), acc.num_processes,
                          group_by_length=t.group_by_length)
        ds_config = configure_deepspeed(acc, cfg, model.lm.config.hidden_size) if self.ds else None
        optimizer, scheduler, self.schedule_name = make_optimizer_and_scheduler(model, t, self.plan, acc, ds_config)
        self.trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        self.total_params = sum(numel(p) for p in model.parameters())
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.resolved = self._resolved_config(ds_config)

    def _resolved_config(self, ds_config) -> dict:
        import accelerate
        import transformers

        acc, plan = self.accelerator, self.plan
        runtime = {
            "num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
            "mixed_precision": acc.mixed_precision, "device": str(acc.device), "compiled_layers": self.compiled,
            "compiled_encoder_layers": self.compiled_encoder, "compiled_prompt_heads": self.compiled_heads,
            "encoder_graphs": self.encoder_graphs, "compile_mode": self.compile_mode, "cuda_graphs": self.cuda_graphs,
            "pad_to_multiple_of": self.pad_multiple,
            "packing": self.packing,
            "deepspeed_zero_stage": ds_config["zero_optimization"].get("stage") if ds_config else None,
            "optimizer": ("deepspeed " if ds_config and "optimizer" in ds_config else "torch ") + "AdamW",
            "lr_schedule": self.schedule_name, "train_examples": len(self.dataset),
            "train_data_sha256": records_digest(self.records), **asdict(plan),
            "trainable_params": self.trainable, "total_params": self.total_params, "command": sys.argv,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__}}
        return {**self.config.to_dict(), "runtime": runtime}

    def _write_config(self) -> None:
        if self.accelerator.is_main_process:
            atomic_write_text(self.log_dir / "config.json", json.dumps(self.resolved, indent=2, sort_keys=True))

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        acc, plan, cfg = self.accelerator, self.plan, self.config
        rng = None
        if self.resume_dir is not None:
            self.state, rng = load_checkpoint(self.resume_dir, acc, self.model, self.optimizer, self.scheduler)
            self.metrics.resume_at(self.state.global_step)
            if self.saved_split != self.split:
                self._convert_position()
            self.log.info("resumed from %s: step %d, epoch %d, batch %d", self.resume_dir, self.state.global_step,
                          self.state.epoch + 1, self.state.batch_in_epoch)
        else:
            self.state = TrainerState(num_processes=acc.num_processes, wandb_run_id=uuid.uuid4().hex[:12])
        self._write_config()
        pct = 100 * self.trainable / max(self.total_params, 1)
        self.log.info("%s on %s/%s: %d trainable parameters of %d (%.4f%%); %d processes, %d steps (%d epochs x %d), "
                      "batch %d, lr %g (%s), mixed precision %s", cfg.model.method, cfg.model.task_name,
                      cfg.model.model_type, self.trainable, self.total_params, pct, acc.num_processes,
                      plan.total_steps, plan.num_epochs, plan.steps_per_epoch, plan.total_batch_size, cfg.train.lr,
                      self.schedule_name, acc.mixed_precision)
        if cfg.output.wandb_logging:
            m = cfg.model
            acc.init_trackers(cfg.output.project_name, config=flatten(self.resolved), init_kwargs={"wandb": {
                "name": f"{m.task_name}/{m.model_type}/{m.method}", "dir": str(self.log_dir),
                "id": self.state.wandb_run_id, "resume": "allow"}})
        if self.memory_warning:
            self.log.warning(self.memory_warning)
        if self.packing_refusal:
            self.log.warning("--packing is not used: %s; the batches run as padded rows (the same loss)",
                             self.packing_refusal)
        if cfg.train.encoder_graphs and not self.encoder_graphs:
            self.log.warning("--encoder_graphs is not used: it needs lopa or idpg, CUDA without DeepSpeed, and a "
                             "BERT/RoBERTa encoder on SDPA")
        self._log_compile_mode()
        skips_before = fast_paths.cudagraph_skips() if self.cuda_graphs else 0
        if acc.device.type == "cuda":  # the peak logged is this run's (run_experiment trains cells in one process)
            torch.cuda.reset_peak_memory_stats(acc.device)
        self.model.train()
        bar = ProgressBar(plan.total_steps, self.state.global_step, acc.is_main_process)
        self._wall = self._rate_clock = (time.perf_counter(), self.state.tokens)
        try:
            # a run that writes checkpoints writes one more when stopped; without them (FFT's default) it stops at once
            with hold_stop_signals() if cfg.output.save_every.every else contextlib.nullcontext(HeldStop()) as held:
                self._held = held
                epoch_losses = self._steps(bar, rng)
        except BaseException:  # Ctrl-C or a crash: loss.png of the steps so far, as a finished run has it
            with contextlib.suppress(Exception):
                bar.close()  # now, not at exit: the hint below the traceback stays the last line
                self._plot_loss()
            raise
        if self.state.epoch_steps:  # --max_train_steps ended the last epoch early: its mean so far
            self.log.info("epoch %d (%d of %d batches): mean loss %.4f", self.state.epoch + 1,
                          self.state.batch_in_epoch, self.plan.batches_per_epoch,
                          self.state.epoch_loss_sum / self.state.epoch_steps)
        bar.close()
        # the training is done: a stop now waits for its weights (the last epoch is in no checkpoint: final/ is)
        with hold_stop_signals("once final/ is written"):
            final = self.final_dir = self._save_final()
            if not cfg.output.keep_checkpoints and acc.is_main_process:  # they protected the run; final/ replaces them
                shutil.rmtree(self.log_dir / CHECKPOINTS_DIR, ignore_errors=True)
            self._plot_loss()
        acc.end_training()
        if self.cuda_graphs:
            self._log_cudagraph_skips(fast_paths.cudagraph_skips() - skips_before)
        if memory := gpu_memory(acc.device):
            self.log.info("GPU memory: at most %.2f GiB held by torch of the card's %.2f GiB (CUDA graphs' memory "
                          "included)", memory["gpu_peak_mem_gib"],
                          torch.cuda.get_device_properties(acc.device).total_memory / 2**30)
        self.log.info("done: %d steps; final weights in %s", self.state.global_step, final)
        return TrainResult(self.log_dir, final, self.state.global_step, epoch_losses, acc.is_main_process)

    def _steps(self, bar: ProgressBar, rng) -> list[float]:
        """The optimizer steps from where the state stands to the plan's end (``rng``: a resumed run's generator
        states, set where it stood); returns the mean loss of each epoch finished here."""
        acc, plan, cfg = self.accelerator, self.plan, self.config
        epoch_losses = []
        pending = None  # the last queued step, read back once the next one is queued behind it
        while self.state.global_step < plan.total_steps:
            batches = iter(self._epoch_loader())
            if rng is not None:  # exactly where the interrupted run stood
                set_rng_state(rng)
                rng = None
            while self.state.global_step < plan.total_steps:
                window = list(itertools.islice(batches, cfg.train.gradient_accumulation_steps))
                if not window:
                    raise RuntimeError("the dataloader ran out before the planned batches")  # a bug, not a user error
                try:
                    queued = self._queue_step(window)
                except BaseException as exc:
                    with contextlib.suppress(Exception):  # log the step before, if the device still answers
                        if pending is not None:
                            self._finish_step(pending, bar)
                    if isinstance(exc, torch.OutOfMemoryError):  # raised on CUDA only
                        self.log.error(self._out_of_memory_hint())
                    raise
                if pending is not None:
                    self._finish_step(pending, bar)
                pending = queued
                state, save = self.state, cfg.output.save_every
                end_of_epoch = state.batch_in_epoch >= plan.batches_per_epoch
                stop = self._stop_now()  # a signal after the looks here waits for the next step boundary
                if end_of_epoch or save.due(step=state.global_step) or state.global_step >= plan.total_steps or stop:
                    self._finish_step(pending, bar)  # an epoch's mean and a checkpoint need this step's numbers
                    pending = None
                    # look again: reading back may wait out the step's device time, and a signal then, in the
                    # last step, would meet no later look (the run would stop without a checkpoint of that step)
                    stop = self._stop_now(last=state.global_step >= plan.total_steps)
                if end_of_epoch:  # closed before a checkpoint is taken, so the next epoch starts from zero
                    epoch_losses.append(state.epoch_loss_sum / state.epoch_steps)
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    state.epoch_loss_sum, state.epoch_steps = 0.0, 0
                    # logged before the checkpoint: a resume from it never logs this epoch's mean again
                    self.log.info("epoch %d: mean loss %.4f", state.epoch, epoch_losses[-1])
                    if cfg.output.wandb_logging:
                        acc.log({"epoch/mean_loss": epoch_losses[-1]}, step=state.global_step)
                last = state.global_step >= plan.total_steps and not cfg.output.keep_checkpoints  # final/ is next
                saved = not last and (save.due(step=state.global_step)
                                      or (end_of_epoch and save.due(epoch=state.epoch)))
                if saved:
                    self._save_checkpoint()
                    self._rate_clock = (time.perf_counter(), self.state.tokens)  # tokens/s leaves out saving
                if stop:
                    self._stop_here(saved)
                if end_of_epoch:
                    if next(batches, None) is not None:
                        raise RuntimeError("the dataloader had more batches than planned")
                    break
        return epoch_losses

    def _convert_position(self) -> None:
        """A resume with another split of the same steps (``batch_split_refusal``): the checkpoint, taken between
        steps, counts the steps done in the epoch in its own micro-batches; the loop skips this run's."""
        (saved_batch, saved_accumulation), (batch, accumulation) = self.saved_split, self.split
        steps, rest = divmod(self.state.batch_in_epoch, saved_accumulation)
        if rest:  # never written by this trainer: a checkpoint is taken only after a whole step
            raise UserError(f"{self.resume_dir}: its batch_in_epoch ({self.state.batch_in_epoch}) stands inside an "
                            f"optimizer step; resume with --per_gpu_train_batch_size {saved_batch} "
                            f"--gradient_accumulation_steps {saved_accumulation}")
        self.state.batch_in_epoch = steps * accumulation
        self.log.info("resuming with micro-batch %d x %d accumulation steps instead of %d x %d: the same %d examples "
                      "per step", batch, accumulation, saved_batch, saved_accumulation, self.plan.total_batch_size)

    def _stop_now(self, last: bool = False) -> bool:
        """Whether to stop at this step boundary: one process stops at the signal it holds; several at the step
        whose numbers (read back a step late) say that any of them held one, so that all stop at the same step.
        ``last`` (every process, after the last step's numbers): no later step would carry a signal that came
        since they were reduced, so the processes compare theirs once more (one small reduction per run)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._held.signum is not None
        if last and not self._stop_agreed:
            held = torch.full((1,), float(self._held.signum is not None), device=acc.device)
            self._stop_agreed = acc.reduce(held, reduction="sum").item() > 0
        return self._stop_agreed

    def _stop_here(self, saved: bool) -> None:
        """Save a checkpoint of this step (unless one was just saved), then raise what the held signal stood for:
        the run stops with the same kind of checkpoint ``--save_every N steps`` writes, and ``--resume_from``
        continues exactly from it."""
        held = self._held.signum
        why = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(held, "another process was stopped")
        if self.accelerator.is_main_process:  # one line per run (every process logs its warnings)
            self.log.warning("%s: stopping after step %d%s", why, self.state.global_step,
                             "" if saved else ", once its checkpoint is saved")
        if not saved:
            self._save_checkpoint()
        raise self._held.interrupt()

    def _out_of_memory_hint(self) -> str:
        """What lowers a step's memory, for the error line of a step that ran out of it, and how to go on: a resume
        from the last checkpoint may change what trades memory for time (``train_checks.RESUME_MAY_DIFFER``) and
        split the same steps into smaller micro-batches where that takes the same examples (``batch_split_refusal``);
        another dtype, or a smaller micro-batch where a resume refuses it, needs a new run."""
        t, m, acc = self.config.train, self.config.model, self.accelerator
        resumable, new_run = [], []
        if self.graph_steps:
            resumable.append("--compile_mode default (the decoder layers' CUDA graphs keep memory of their own)")
        if not t.gradient_checkpointing and t.compile_mode != "reduce-overhead":  # refused together
            resumable.append("--gradient_checkpointing (activations recomputed instead of kept)")
        smaller = smaller_micro_batches(len(self.dataset), acc.num_processes, self.split)
        if smaller and batch_split_refusal(self.split, smaller[0], len(self.dataset), acc.num_processes,
                                           group_by_length=t.group_by_length) is None:
            resumable.append(f"--per_gpu_train_batch_size {smaller[0][0]} --gradient_accumulation_steps "
                             f"{smaller[0][1]} (the same {self.plan.total_batch_size} examples per step; "
                             f"{self.split[0]} x {self.split[1]} now)")
        elif self.split[0] > 1:
            new_run.append(f"a smaller --per_gpu_train_batch_size with more --gradient_accumulation_steps (the same "
                           f"batch; {self.split[0]} x {self.split[1]} now)")
        if m.method != "fft" and t.model_dtype == "fp32":
            new_run.append("--model_dtype bf16 (half the frozen weights)")
        step = f"out of GPU memory in step {self.state.global_step + 1}"
        if not resumable and not new_run:
            return (f"{step}: its micro-batch is 1 and nothing else here lowers a step's memory; use a GPU with more "
                    f"memory, or cut the examples shorter with --max_length (a new run)")
        if not has_resumable_checkpoint(self.log_dir):
            return f"{step}: {'; '.join(resumable + new_run)}. Then {continue_hint(self.log_dir)}"
        if not resumable:
            return (f"{step}: a new run (another --log_dir) with {' or '.join(new_run)}; a resume from the last "
                    f"checkpoint keeps the micro-batch and the dtype here")
        return (f"{step}. To go on from the last checkpoint, {continue_hint(self.log_dir)}, adding "
                f"{' or '.join(resumable)}" + (f"; a new run can also take {' or '.join(new_run)}" if new_run else ""))

    def _plot_loss(self) -> None:
        if self.accelerator.is_main_process:
            m = self.config.model
            plot_loss(self.metrics.path, self.log_dir / LOSS_PLOT, f"{m.method} {m.task_name} {m.model_type}")

    def _log_compile_mode(self) -> None:
        """Where --compile_mode reduce-overhead records no CUDA graphs, the log says so (and config.json's runtime:
        compile_mode, cuda_graphs), as for --encoder_graphs: the same command line runs as a CPU smoke test."""
        t, device = self.config.train, self.accelerator.device.type
        if t.compile_mode == "auto" and self.compiled:
            self.log.info("--compile_mode auto: %s", "reduce-overhead, the decoder layers replayed from CUDA graphs "
                          "(--compile_mode default turns them off)" if self.no_graphs_reason is None else
                          f"the default mode, no CUDA graphs ({self.no_graphs_reason})")
        if t.compile_mode == "reduce-overhead" and not self.compiled:
            self.log.warning("--compile_mode reduce-overhead is not used: --compile auto compiles only on CUDA without "
                             "DeepSpeed (here: %s); --compile on compiles anyway", device)
        elif self.graph_steps and not self.cuda_graphs:
            self.log.warning("--compile_mode reduce-overhead on %s: torch.compile records no CUDA graphs there (the "
                             "layers compile as in the default mode)", device)
        if self.pad_multiple:
            self.log.info("batch widths rounded up to a multiple of %d (padded and packed rows)", self.pad_multiple)

    def _log_cudagraph_skips(self, skips: int) -> None:
        """Under CUDA graphs, whether torch skipped any (it then runs that compiled graph without one, and says why
        only with TORCH_LOGS=cudagraphs): config.json's runtime.cuda_graphs says what was asked for, this line what
        happened."""
        if skips:
            self.log.warning("--compile_mode reduce-overhead: torch ran %d compiled graphs without CUDA graphs "
                             "(TORCH_LOGS=cudagraphs says why); those steps ran as in the default mode", skips)
        else:
            self.log.info("--compile_mode reduce-overhead: no compiled graph skipped its CUDA graph")

    def _epoch_loader(self):
        acc, skip = self.accelerator, self.state.batch_in_epoch
        loader = self.dataloader
        if skip:
            loader = acc.skip_first_batches(loader, skip)
            # accelerate's new loader drops the non-blocking copy (accelerate #4295): each copy would wait for the GPU
            loader._non_blocking = getattr(self.dataloader, "_non_blocking", False)
        loader.set_epoch(self.state.epoch)  # accelerate re-applies its own epoch counter when iteration starts
        self.sampler.set_epoch(self.state.epoch)
        return loader

    def _queue_step(self, window: list[dict]) -> _QueuedStep:
        """One optimizer step over ``window`` (this process's micro-batches), queued on the device.

        The counts, the loss scale and the loss stay on the device: nothing here waits for the GPU, so the host can
        prepare and queue the next step (its batch, LOPA's eager encoder, the embedding) while the GPU still runs
        this one. ``_finish_step`` reads the numbers back, in one copy, once the next step is queued."""
        acc = self.accelerator
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        sup = [supervised_tokens(b["labels"], self.has_prompt) for b in window]
        counts = acc.reduce(torch.stack([sum(sup), sum(b["attention_mask"].sum() for b in window)]).to(acc.device),
                            reduction="sum")
        # backward divides by GA and DDP/DeepSpeed average over processes: undo both, divide by the true count;
        # in float64, as the Python float this once was, so the fp32 factor is the same
        scale = acc.num_processes * acc.gradient_accumulation_steps / counts[0].clamp(min=1).double()
        loss_sum = torch.zeros((), device=acc.device)
        stable_grads = self.graph_steps and len(window) > 1
        if stable_grads:
            self._allocate_grads()
        for i, (batch, n) in enumerate(zip(window, sup)):
            last = i == len(window) - 1
            acc.sync_gradients = last
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                if self.graph_steps:  # the graphs may overwrite the last micro-batch's outputs: all consumed
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.model(**{k: v for k, v in batch.items() if k != "task_ids"})  # "host" included
                # only a micro-batch with nothing supervised (loss 0/0) is zeroed: a diverged run must log NaN
                micro_loss = torch.where(n > 0, out.loss, torch.nan_to_num(out.loss))
                acc.backward(micro_loss * (n * scale).to(micro_loss.dtype))
            loss_sum += micro_loss.detach().float() * n
        grad_norm = None
        if self.config.train.max_grad_norm and not self.ds:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.config.train.max_grad_norm)
        skipped = optimizer_step(acc, self.optimizer)
        if self.ds and hasattr(self.model, "get_global_grad_norm"):  # the engine clipped (and measured) in its step
            grad_norm = self.model.get_global_grad_norm()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not stable_grads)
        # a held stop signal rides on the loss's reduction: every process learns of a stop any of them received,
        # at the same step, without a collective or a wait of its own (a fill, not a copy from the host)
        stop = torch.full_like(loss_sum, float(self._held.signum is not None))
        loss_and_stop = acc.reduce(torch.stack([loss_sum, stop]), reduction="sum").double()
        numbers = [loss_and_stop[0], counts[0].double(), counts[1].double(), loss_and_stop[1]]
        if isinstance(grad_norm, torch.Tensor):
            numbers.append(grad_norm.detach().double().to(acc.device))
        self.state.global_step += 1
        self.state.batch_in_epoch += len(window)
        return _QueuedStep(self.state.global_step, self.state.epoch + 1, lr, torch.stack(numbers),
                           None if isinstance(grad_norm, torch.Tensor) else grad_norm, time.perf_counter())

    def _allocate_grads(self) -> None:
        """Zeroed gradients for the trained tensors where they have none, so that backward adds into them. A first
        backward would otherwise keep a CUDA graph's output as the gradient (autograd takes it over), and the next
        micro-batch's graphs overwrite that memory (torch's "accessing gradient tensor output of CUDAGraphs that has
        been overwritten"); accumulating into zeros gives the same sums. (Every trained tensor gets a gradient in
        every step of these methods, so AdamW skips no tensor it would have skipped with no gradient.)"""
        if self._trained is None:
            self._trained = [p for p in self.model.parameters() if p.requires_grad]
        for param in self._trained:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def _finish_step(self, step: _QueuedStep, bar: ProgressBar) -> None:
        """Read a queued step's numbers back (the one wait for the device per step), count them, log them."""
        values = step.numbers.tolist()
        # a GPU step ends when its numbers come back; read a step late, a CPU step ended long before (tokens/s)
        done = step.queued_at if step.numbers.device.type == "cpu" else time.perf_counter()
        total_sup, total_tokens = int(values[1]), int(values[2])
        self._stop_agreed = self._stop_agreed or values[3] > 0
        grad_norm = values[4] if len(values) > 4 else step.grad_norm
        state = self.state
        state.tokens += total_tokens
        loss = values[0] / max(total_sup, 1)
        state.epoch_loss_sum += loss
        state.epoch_steps += 1
        record = {"step": step.step, "epoch": step.epoch, "loss": loss, "lr": step.lr, "tokens": state.tokens}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self._log(record, bar, done)

    def _log(self, record: dict, bar: ProgressBar, now: float) -> None:
        """``now``: when the step ended."""
        self.state.elapsed += now - self._wall[0]
        start, tokens0 = self._rate_clock
        record["tokens_per_s"] = (record["tokens"] - tokens0) / max(now - start, 1e-9)
        record["elapsed"] = round(self.state.elapsed, 3)
        self._wall = self._rate_clock = (now, record["tokens"])
        bar.update(record)
        if record["step"] % self.config.output.log_every == 0 or record["step"] == self.plan.total_steps:
            record.update(gpu_memory(self.accelerator.device))
            self.metrics.write(record)
            if self.config.output.wandb_logging:
                self.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    # ------------------------------------------------------------------------------------------ saving
    def _write_adapter(self, directory: pathlib.Path) -> None:
        from custom_peft import save_adapter

        save_adapter(self.accelerator.unwrap_model(self.model), directory)

    def _write_final(self, tmp: pathlib.Path, state_dict: dict | None) -> None:
        if state_dict is None:
            self._write_adapter(tmp)
        else:
            lm = self.accelerator.unwrap_model(self.model).lm
            lm_state = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
            lm.save_pretrained(tmp, state_dict=lm_state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        (tmp / "training_config.json").write_text(json.dumps(self.resolved, indent=2, sort_keys=True))
        open_file_modes(tmp)

    def _save_checkpoint(self) -> None:
        path = save_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, self.state,
                               self.resolved, self.log_dir / CHECKPOINTS_DIR,
                               write_adapter=None if self.config.model.method == "fft" else self._write_adapter,
                               total_limit=self.config.output.save_total_limit)
        self.log.info("checkpoint %s", path)

    def _save_final(self) -> pathlib.Path:
        """``final/``: the adapter (PEFT) or a Hugging Face model directory (fft), written then renamed."""
        acc = self.accelerator
        final, tmp = self.log_dir / "final", self.log_dir / ".tmp-final"
        # fft: every process takes part (ZeRO-3 gathers the partitioned weights)
        state_dict = acc.get_state_dict(self.model) if self.config.model.method == "fft" else None
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            with unfinished_directory(tmp, lambda: f"it was removed, final/ is as it was; {resume_hint(self.log_dir)}"):
                self._write_final(tmp, state_dict)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        return final
