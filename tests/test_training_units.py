"""Pieces of the training loop without a training run: plan, data order across processes, loss bookkeeping,
atomic checkpoints."""
import json
import math
import os
import pathlib

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from tests.conftest import ROOT
from utils.batching import IGNORE_INDEX, EpochSampler, shorten, supervised_tokens
from utils.checkpoint import (LATEST, TrainerState, find_checkpoint, load_checkpoint, prune_checkpoints,
                              save_checkpoint)
from utils.errors import UserError
from utils.train_config import TrainArgs
from utils.train_setup import (batch_split_refusal, make_plan, param_groups, reset_accelerate_state, same_steps,
                               smaller_micro_batches, venv_extension_cache)


@pytest.mark.parametrize("processes, per_process_batches, steps", [(1, 244, 2440), (4, 61, 610), (8, 31, 310)])
def test_plan_counts_steps_per_process_after_sharding(processes, per_process_batches, steps):
    # MBPP's 487 training examples, batch 2 per process (spec §5: 244 pre-shard batches, 61 per process on 4 GPUs)
    batches = math.ceil(math.ceil(487 / 2) / processes)
    assert batches == per_process_batches
    plan = make_plan(TrainArgs(num_epochs=10, per_gpu_train_batch_size=2), batches, processes)
    assert (plan.steps_per_epoch, plan.total_steps, plan.total_batch_size) == (per_process_batches, steps,
                                                                                2 * processes)
    fft = make_plan(TrainArgs(num_epochs=10, gradient_accumulation_steps=2, warmup_ratio=0.1), batches, processes)
    assert fft.steps_per_epoch == math.ceil(per_process_batches / 2)
    assert fft.warmup_steps == math.ceil(0.1 * fft.total_steps)
    capped = make_plan(TrainArgs(num_epochs=10, max_train_steps=100, num_warmup_steps=7), batches, processes)
    assert (capped.total_steps, capped.warmup_steps) == (100, 7)
    assert capped.num_epochs == math.ceil(100 / per_process_batches)
    with pytest.raises(UserError, match=r"--num_warmup_steps 100 is not below the run's 100 optimizer steps"):
        make_plan(TrainArgs(max_train_steps=100, num_warmup_steps=100), batches, processes)
    # FFT's smoke run of one step: no warmup (a warmup of its only step trained at lr 0); two steps warm up over one
    assert make_plan(TrainArgs(max_train_steps=1, warmup_ratio=0.1), batches, processes).warmup_steps == 0
    assert make_plan(TrainArgs(max_train_steps=2, warmup_ratio=0.1), batches, processes).warmup_steps == 1


def test_the_total_batch_size_counts_accumulation_and_processes():
    plan = make_plan(TrainArgs(per_gpu_train_batch_size=2, gradient_accumulation_steps=4), 61, 4)
    assert (plan.total_batch_size, plan.steps_per_epoch) == (32, 16)


def test_epoch_sampler_is_a_seeded_permutation_that_ignores_the_global_rng():
    sampler = EpochSampler(10, seed=3)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == first and sorted(first) == list(range(10))
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(10))


def test_two_processes_see_the_global_batches_of_one_process_with_twice_the_batch():
    data = list(range(16))
    single = DataLoader(data, batch_size=4, sampler=EpochSampler(16, seed=5))
    shards = [prepare_data_loader(DataLoader(data, batch_size=2, sampler=EpochSampler(16, seed=5)),
                                  num_processes=2, process_index=p, put_on_device=False) for p in range(2)]
    for epoch in (0, 1):
        single.sampler.set_epoch(epoch)
        for shard in shards:
            shard.set_epoch(epoch)
        global_batches = [sorted(b.tolist()) for b in single]
        per_process = [[b.tolist() for b in shard] for shard in shards]
        assert [sorted(a + b) for a, b in zip(*per_process)] == global_batches
    reset_accelerate_state()


def _steps_of(examples: int, processes: int, batch: int, accumulation: int) -> tuple[list[list[int]], int]:
    """Each optimizer step's examples, all processes together, as accelerate's sharded dataloaders deal them, and
    the micro-batches per process (what sizes the plan)."""
    shards = [prepare_data_loader(DataLoader(list(range(examples)), batch_size=batch,
                                             sampler=EpochSampler(examples, seed=5)),
                                  num_processes=processes, process_index=p, put_on_device=False)
              for p in range(processes)]
    per_process = [[b.tolist() for b in shard] for shard in shards]
    steps = [sorted(i for batches in per_process for b in batches[k:k + accumulation] for i in b)
             for k in range(0, len(per_process[0]), accumulation)]
    return steps, len(shards[0])


def test_another_split_of_the_steps_takes_the_same_examples_exactly_where_same_steps_says_so():
    """A resume may take b x a's steps in micro-batches of b' x a' (b'a' = ba) where ``same_steps`` says each step
    holds the same examples: here checked against accelerate's own sharding. One process: always, the last, partial
    step of an epoch included (6 examples in steps of 4: 2 x 2 and 1 x 4 both end with the last 2). Several: not
    where the examples accelerate repeats to even out the processes differ (6 examples on 2 processes: 2 x 2 repeats
    2 in its last step, 1 x 4 none). The plan's steps per epoch never differ."""
    for examples in range(1, 14):
        for processes in (1, 2, 3):
            for product in (4, 6):
                splits = [(b, product // b) for b in range(1, product + 1) if product % b == 0]
                dealt = {split: _steps_of(examples, processes, *split) for split in splits}
                steps = {split: dealt[split][0] for split in splits}
                for split in splits:
                    plan = make_plan(TrainArgs(per_gpu_train_batch_size=split[0], num_epochs=1,
                                               gradient_accumulation_steps=split[1]), dealt[split][1], processes)
                    assert plan.steps_per_epoch == len(steps[split]) == math.ceil(examples / (processes * product))
                    for other in splits:
                        case = (examples, processes, split, other)
                        assert (steps[split] == steps[other]) == same_steps(examples, processes, split, other), case
    reset_accelerate_state()
    assert same_steps(6, 1, (2, 2), (1, 4)) and not same_steps(6, 2, (2, 2), (1, 4))
    assert not same_steps(8, 1, (2, 2), (1, 2))  # another number of examples per step
    assert smaller_micro_batches(6, 1, (4, 2)) == [(2, 4), (1, 8)] and smaller_micro_batches(6, 2, (2, 2)) == []
    assert smaller_micro_batches(8, 2, (2, 2)) == [(1, 4)] and smaller_micro_batches(6, 1, (1, 4)) == []


def test_a_refused_split_names_the_smaller_micro_batches_of_the_checkpoints_that_would_take_its_steps():
    """6 examples on 2 processes in steps of 4 x 1: 2 x 2 repeats as many examples (2), 1 x 4 none. The refusal of
    1 x 4 names 2 x 2, a smaller micro-batch of the checkpoint's split (not of the refused one, which has none)."""
    refusal = batch_split_refusal((4, 1), (1, 4), 6, 2, group_by_length=False)
    assert refusal == ("the checkpoint's micro-batch x accumulation steps is 4 x 1, this run's 1 x 4: with 2 processes "
                       "and 6 examples accelerate repeats examples to give each process as many micro-batches, 2 with "
                       "micro-batches of 4, 0 with 1, so the last step of each epoch would train on other examples "
                       "(2 x 2 would not)")
    assert batch_split_refusal((4, 1), (2, 2), 6, 2, group_by_length=False) is None


def _hint_trainer(tmp_path, batch: int, dtype: str = "fp32", checkpoint: bool = False):
    """What ``Trainer._out_of_memory_hint`` reads, without building a model: a PT run on 6 examples, one process."""
    from types import SimpleNamespace

    log_dir = tmp_path / f"run_{batch}_{dtype}_{checkpoint}"
    if checkpoint:
        (log_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
        (log_dir / "checkpoints" / LATEST).write_text("step_00000002\n")
    train = TrainArgs(per_gpu_train_batch_size=batch, gradient_checkpointing=True, model_dtype=dtype)
    return SimpleNamespace(config=SimpleNamespace(train=train, model=SimpleNamespace(method="pt")),
                           accelerator=SimpleNamespace(num_processes=1), graph_steps=0, dataset=[None] * 6,
                           split=(batch, 1), ds=False, plan=SimpleNamespace(total_batch_size=batch),
                           state=SimpleNamespace(global_step=2), log_dir=log_dir)


def test_the_out_of_memory_hint_names_the_largest_smaller_micro_batch_and_nothing_for_a_new_run_without_one(
        tmp_path):
    """A micro-batch of 4: 2 x 2 and 1 x 4 take the same steps; the hint names the largest, with its accumulation.
    With a checkpoint and bf16 already, a resume is the only way named (no empty "a new run can also take")."""
    from utils.training import Trainer

    hint = Trainer._out_of_memory_hint(_hint_trainer(tmp_path, 4))
    assert hint.startswith("out of GPU memory in step 3: --per_gpu_train_batch_size 2 --gradient_accumulation_steps 2 "
                           "(the same 4 examples per step; 4 x 1 now); --model_dtype bf16 (half the frozen weights). "
                           "Then rerun without --resume_from"), hint
    saved = _hint_trainer(tmp_path, 2, dtype="bf16", checkpoint=True)
    assert Trainer._out_of_memory_hint(saved) == (
        f"out of GPU memory in step 3. To go on from the last checkpoint, rerun with --resume_from {saved.log_dir}: it "
        f"continues from step_00000002, the last complete checkpoint, adding --per_gpu_train_batch_size 1 "
        f"--gradient_accumulation_steps 2 (the same 2 examples per step; 2 x 1 now)")


def test_a_held_stop_saves_a_checkpoint_of_its_step_unless_one_was_just_saved_and_raises_what_the_signal_was(
        caplog):
    """``Trainer._stop_here``: a step that just saved its checkpoint (an epoch's end, --save_every) is not saved
    twice; Ctrl-C raises KeyboardInterrupt, SIGTERM Terminated, a stop that only another process received Terminated
    too, each named in the log (by the main process only: another one saves its part without a line)."""
    import logging
    import signal
    from types import SimpleNamespace

    from utils.errors import HeldStop, Terminated
    from utils.training import Trainer

    for signum, saved, main, raised, lines in (
            (signal.SIGTERM, True, True, Terminated, ["SIGTERM: stopping after step 3"]),
            (signal.SIGINT, False, True, KeyboardInterrupt,
             ["Ctrl-C: stopping after step 3, once its checkpoint is saved"]),
            (None, False, True, Terminated, ["another process was stopped: stopping after step 3, once its checkpoint "
                                             "is saved"]),
            (signal.SIGTERM, False, False, Terminated, [])):
        saves, held = [], HeldStop()
        held.signum = signum
        trainer = SimpleNamespace(_held=held, state=SimpleNamespace(global_step=3), log=logging.getLogger("stop"),
                                  accelerator=SimpleNamespace(is_main_process=main),
                                  _save_checkpoint=lambda: saves.append(1))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stop"), pytest.raises(KeyboardInterrupt) as stopped:
            Trainer._stop_here(trainer, saved)
        assert type(stopped.value) is raised and caplog.messages == lines
        assert len(saves) == (0 if saved else 1)


def test_the_rest_of_a_resumed_epoch_is_copied_to_the_device_without_waiting_too():
    """accelerate's ``skip_first_batches`` builds its loader without the ``non_blocking`` copy (accelerate #4295):
    after a resume mid-epoch every batch copy would wait for the GPU until the epoch ends. Same batches, same order."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from utils.training import Trainer

    reset_accelerate_state()
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(non_blocking=True))
    sampler = EpochSampler(12, seed=5)
    loader = acc.prepare(DataLoader(list(range(12)), batch_size=2, sampler=sampler))
    trainer = SimpleNamespace(accelerator=acc, dataloader=loader, sampler=sampler,
                              state=SimpleNamespace(epoch=1, batch_in_epoch=0))
    whole = [b.tolist() for b in Trainer._epoch_loader(trainer)]
    trainer.state.batch_in_epoch = 2
    rest = Trainer._epoch_loader(trainer)
    assert loader._non_blocking and rest._non_blocking
    assert [b.tolist() for b in rest] == whole[2:]
    reset_accelerate_state()


def test_supervised_tokens_counts_what_the_loss_averages():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX],
                           [7, IGNORE_INDEX, IGNORE_INDEX, 8, 9]])
    # without a soft prompt the first label has no predictor; with one, the last virtual token predicts it
    assert int(supervised_tokens(labels, has_soft_prompt=False)) == 4
    assert int(supervised_tokens(labels, has_soft_prompt=True)) == 5


def test_shorten_cuts_the_prompt_from_the_left_and_keeps_the_answer():
    example = {"task_id": "x", "input_ids": list(range(10)), "labels": [IGNORE_INDEX] * 6 + [6, 7, 8, 9]}
    short = shorten(example, 6)
    assert short["input_ids"] == [4, 5, 6, 7, 8, 9] and short["labels"] == [IGNORE_INDEX] * 2 + [6, 7, 8, 9]
    tight = shorten(example, 3)  # one prompt token stays, the answer loses its end
    assert tight["input_ids"] == [5, 6, 7] and tight["labels"] == [IGNORE_INDEX, 6, 7]
    assert shorten(example, 10) is example


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert len(param_groups(model, 0.0)) == 1


def test_weight_decay_groups_read_the_full_shape_of_zero3_partitioned_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    for p in model.parameters():  # what deepspeed.zero.Init leaves on a process: an empty 1-D shard
        p.ds_shape, p.ds_numel, p.data = p.shape, p.numel(), torch.empty(0)
    decay, no_decay = param_groups(model, 0.05)
    assert [p.ds_shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 3


@pytest.mark.parametrize("key, value, message", [
    ("gradient_clipping", 0.5, "gradient_clipping=0.5 but this run uses 1.0"),
    ("train_batch_size", 64, "train_batch_size=64 but this run uses 4"),
    ("gradient_accumulation_steps", 4, "gradient_accumulation_steps=4 but this run uses 2"),
])
def test_deepspeed_json_numbers_must_agree_with_the_command_line(key, value, message):
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from utils.train_args import parse_args
    from utils.train_setup import configure_deepspeed

    config = parse_args(["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                         "--gradient_accumulation_steps", "2", "--log_dir", "unused"], "peft")

    def configured(**changes):
        ds = {**json.loads((ROOT / "config_files" / "zero_stage2_nofp16_config.json").read_text()), **changes}
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=1)
        return configure_deepspeed(accelerator, config, hidden_size=64)

    filled = configured()  # "auto" everywhere: the command line's values
    assert [filled[k] for k in ("gradient_clipping", "train_batch_size", "gradient_accumulation_steps")] == [1.0, 4, 2]
    assert configured(**{key: filled[key]})[key] == filled[key]  # an agreeing number is fine
    with pytest.raises(UserError, match=message):
        configured(**{key: value})



# "auto" is accelerate's zero3_save_16bit_model (false unless an accelerate YAML sets it)
@pytest.mark.parametrize("value, written", [(None, True), (True, True), (False, None), ("auto", None)])
def test_zero3_gathers_the_weights_final_needs_or_refuses_before_training(tmp_path, value, written):
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from utils.train_args import parse_args
    from utils.train_setup import configure_deepspeed

    ds = json.loads((ROOT / "config_files" / "zero_stage3_config.json").read_text())
    key = "stage3_gather_16bit_weights_on_model_save"
    ds["zero_optimization"].pop(key)  # absent: DeepSpeed's default False, and final/ failed after the whole run
    if value is not None:
        ds["zero_optimization"][key] = value
    (path := tmp_path / "my_zero3.json").write_text(json.dumps(ds))
    config = parse_args(["--task_name", "mbpp", "--model_type", "tiny-llama", "--log_dir", "unused",
                         "--path_to_ds_config", str(path)], "fft")
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=1)
    if written is None:
        with pytest.raises(UserError, match=f"my_zero3.json: zero_optimization.{key} resolves to False"):
            configure_deepspeed(accelerator, config, hidden_size=64)
    else:
        assert configure_deepspeed(accelerator, config, hidden_size=64)["zero_optimization"][key] is written


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def accelerated(tmp_path):
    from accelerate import Accelerator
    from transformers import get_scheduler

    reset_accelerate_state()
    acc = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    opt = torch.optim.AdamW([model.weight], lr=0.1)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
    model, opt, sched = acc.prepare(model, opt, sched)
    yield acc, model, opt, sched
    reset_accelerate_state()


def _train_step(model, opt, sched):
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path, accelerated):
    acc, model, opt, sched = accelerated
    _train_step(model, opt, sched)
    state = TrainerState(global_step=1, epoch=0, batch_in_epoch=1, num_processes=1)
    path = save_checkpoint(acc, model, opt, sched, state, {"x": 1}, tmp_path / "checkpoints")
    assert path.name == "step_00000001" and (tmp_path / "checkpoints" / LATEST).read_text() == "step_00000001\n"
    saved_weight = model.weight.detach().clone()
    expected_draw = torch.rand(3)
    _train_step(model, opt, sched)
    assert not torch.equal(model.weight, saved_weight)
    restored, rng = load_checkpoint(find_checkpoint(tmp_path), acc, model, opt, sched)
    assert restored == state and json.loads((path / "config.json").read_text()) == {"x": 1}
    assert torch.equal(model.weight, saved_weight)
    assert sched.scheduler.last_epoch == 1 and opt.state_dict()["state"][0]["step"] == 1
    from utils.checkpoint import set_rng_state

    set_rng_state(rng)
    assert torch.equal(torch.rand(3), expected_draw)


def test_a_checkpoint_restores_every_field_of_the_trainer_state_every_rng_and_holds_only_trained_tensors(
        tmp_path, accelerated):
    # the round trip above uses a state of defaults: a field lost on the way (tokens, elapsed, the wandb run id, the
    # epoch's loss so far) would read back as its default and pass
    import dataclasses
    import random

    import numpy as np

    from utils.checkpoint import set_rng_state

    acc, model, opt, sched = accelerated
    state = TrainerState(global_step=7, epoch=2, batch_in_epoch=4, tokens=1234, elapsed=56.5, num_processes=1,
                         wandb_run_id="abc123def456", epoch_loss_sum=3.25, epoch_steps=2)
    defaults = TrainerState()
    assert all(getattr(state, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(TrainerState)
               if f.name != "num_processes")
    path = save_checkpoint(acc, model, opt, sched, state, {}, tmp_path / "checkpoints")
    # the frozen bias is the model's, not the run's: a PEFT checkpoint of phi-2 would otherwise hold 11 GB of base
    assert set(load_file(str(path / "trainable.safetensors"))) == {"weight"}
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restored, rng = load_checkpoint(find_checkpoint(tmp_path), acc, model, opt, sched)
    assert restored == state
    set_rng_state(rng)
    draws = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == expected[:2] and torch.equal(draws[2], expected[2])


def test_latest_moves_only_once_the_new_checkpoint_is_in_place(tmp_path, accelerated, monkeypatch):
    acc, model, opt, sched = accelerated
    root = tmp_path / "checkpoints"
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=1), {}, root)
    real = os.replace

    def killed_at_the_rename(src, dst, *args, **kwargs):
        if pathlib.Path(src).name == ".tmp-step_00000002":
            raise KeyboardInterrupt  # stands in for a kill between the checkpoint's writing and its rename
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2), {}, root)
    monkeypatch.undo()
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert find_checkpoint(tmp_path) == root / "step_00000001"
    load_checkpoint(find_checkpoint(tmp_path), acc, model, opt, sched)


def test_a_checkpoint_written_by_another_number_of_processes_is_refused(tmp_path, accelerated):
    acc, model, opt, sched = accelerated
    path = save_checkpoint(acc, model, opt, sched, TrainerState(global_step=1, num_processes=2), {},
                           tmp_path / "checkpoints")
    with pytest.raises(UserError, match="field 'num_processes' is 2 but this run has 1"):
        load_checkpoint(path, acc, model, opt, sched)



@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_file_is_one_line_naming_it_and_the_earlier_checkpoints(tmp_path, accelerated, name,
                                                                                    damage):
    # a checkpoint cut short after the fact (a copy, a disk error) gave a traceback that named no file
    acc, model, opt, sched = accelerated
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        _train_step(model, opt, sched)
        save_checkpoint(acc, model, opt, sched, TrainerState(global_step=step), {}, root)
    path = root / "step_00000002" / name
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(UserError) as error:
        load_checkpoint(find_checkpoint(tmp_path), acc, model, opt, sched)
    assert str(error.value).startswith(f"{path}: ")
    assert str(error.value).endswith(f"the checkpoint is damaged: pass an earlier one to --resume_from "
                                     f"({root / 'step_00000001'}) (a run_experiment cell: remove {tmp_path} and "
                                     f"rerun; it trains afresh)")
    load_checkpoint(root / "step_00000001", acc, model, opt, sched)  # the earlier one still resumes

def test_a_failed_save_never_becomes_latest(tmp_path, accelerated):
    acc, model, opt, sched = accelerated
    root = tmp_path / "checkpoints"
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=1), {}, root)

    def broken_adapter(directory):
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2), {}, root, write_adapter=broken_adapter)
    assert (root / LATEST).read_text().strip() == "step_00000001" and not (root / "step_00000002").exists()
    assert not (root / ".tmp-step_00000002").exists()  # removed at once: it would only hold disk space
    assert find_checkpoint(tmp_path) == root / "step_00000001"
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=3), {}, root)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000001", "step_00000003"]


def test_a_resave_of_the_latest_step_cut_off_mid_swap_leaves_a_resumable_checkpoint(tmp_path, accelerated,
                                                                                      monkeypatch):
    """After resuming from an older checkpoint, a run re-saves a step that `latest` may already name."""
    acc, model, opt, sched = accelerated
    root = tmp_path / "checkpoints"
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2, epoch=0), {}, root)
    original = (root / "step_00000002" / "trainer_state.json").read_text()

    def crash(name, stage):
        if stage == "moved-aside":
            raise KeyboardInterrupt  # stands in for a kill between the two renames

    monkeypatch.setattr("utils.checkpoint._kill_hook", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2, epoch=1), {}, root)
    found = find_checkpoint(tmp_path)
    assert found == root / ".old-step_00000002" and (found / "trainer_state.json").read_text() == original
    monkeypatch.undo()
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2, epoch=1), {}, root)
    assert find_checkpoint(tmp_path) == root / "step_00000002"
    assert TrainerState.read(root / "step_00000002" / "trainer_state.json").epoch == 1
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000002"]
    # resumed from the aside copy, the run goes on to later steps: the copy goes with the next checkpoint
    monkeypatch.setattr("utils.checkpoint._kill_hook", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2, epoch=2), {}, root)
    monkeypatch.undo()
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=4), {}, root, total_limit=1)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000004"]



def test_a_kill_between_the_first_checkpoints_rename_and_latest_leaves_it_resumable(tmp_path, accelerated):
    # step_N/ exists only once complete; the error said "saved no checkpoint" and advised removing the log_dir
    from utils.train_checks import _has_checkpoint

    acc, model, opt, sched = accelerated
    root = tmp_path / "checkpoints"
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=1), {}, root)
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2), {}, root)
    (root / LATEST).unlink()  # as the kill leaves it: renamed into place, `latest` not yet written
    (root / ".tmp-step_00000003").mkdir()  # an unfinished save is never read
    assert find_checkpoint(tmp_path) == root / "step_00000002" and _has_checkpoint(tmp_path)
    # the full-disk hint agrees: a disk that filled before `latest` leaves the same checkpoint to resume
    from utils.checkpoint import resume_hint

    assert "--resume_from" in resume_hint(tmp_path) and "step_00000002" in resume_hint(tmp_path)
    assert "without --resume_from" in resume_hint(tmp_path / "elsewhere")


def test_open_file_modes_opens_private_files_and_keeps_execute_bits(tmp_path):
    """A DeepSpeed checkpoint holds zero_to_fp32.py, which DeepSpeed makes executable; opening up the 0600 files
    that mkstemp / safetensors write must not take that bit away."""
    import os

    from utils.fileio import current_umask, open_file_modes

    private, script = tmp_path / "trainable.safetensors", tmp_path / "sub" / "zero_to_fp32.py"
    script.parent.mkdir()
    for path, mode in ((private, 0o600), (script, 0o744)):
        path.write_text("x")
        os.chmod(path, mode)
    open_file_modes(tmp_path)
    plain = 0o666 & ~current_umask()
    assert (private.stat().st_mode & 0o777, script.stat().st_mode & 0o777) == (plain, plain | 0o100)


def test_prune_keeps_the_newest_and_find_checkpoint_explains_problems(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    (root / LATEST).write_text("step_00000004\n")
    removed = prune_checkpoints(root, keep=1)
    assert [p.name for p in removed] == ["step_00000002"]  # step 4 is `latest`, so it stays
    assert find_checkpoint(tmp_path).name == "step_00000004"
    (root / LATEST).write_text("step_00000002\n")
    with pytest.raises(UserError, match="names 'step_00000002'"):
        find_checkpoint(tmp_path)
    with pytest.raises(UserError, match="not a checkpoint"):
        find_checkpoint(tmp_path / "elsewhere")


def test_bf16_on_a_gpu_without_it_is_a_clear_error(monkeypatch):
    """An older GPU (V100, T4) under the paper preset's bf16: one line that names the GPU and the way out; "auto"
    picks no mixed precision there. Such a GPU answers torch.cuda.is_bf16_supported() with True (it can hold bf16
    tensors; torch emulates the arithmetic, slowly) and False only with including_emulation=False."""
    from utils import train_setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    with pytest.raises(UserError, match=r"--mixed_precision bf16: this GPU \(Tesla V100-SXM2-32GB\) has no "
                                        r"native bfloat16 \(torch would only emulate it\); pass --mixed_precision "
                                        r"fp16 or no"):
        train_setup._resolve_mixed_precision("bf16", deepspeed=False)
    assert train_setup._resolve_mixed_precision("auto", deepspeed=False) == "no"
    assert train_setup._resolve_mixed_precision("fp16", deepspeed=False) == "fp16"


@pytest.mark.parametrize("fused", [False, True])
def test_an_fp16_overflow_step_counts_as_skipped_with_the_fused_adamw_too(fused):
    """fp16 on a GPU: an overflow skips the update, and the schedule must not advance. Fused AdamW skips inside its
    kernel, so accelerate's own flag stays False (accelerate issue #4242); the CPU's GradScaler and fused AdamW
    take the same path here."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from utils.train_setup import optimizer_step

    reset_accelerate_state()
    Accelerator(cpu=True)  # the wrapper reads accelerate's process state
    layer = torch.nn.Linear(4, 4)
    before = layer.weight.detach().clone()
    try:
        for init_scale, overflows in ((2.0 ** 127, True), (1.0, False)):
            scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
            optimizer = AcceleratedOptimizer(torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused),
                                             device_placement=False, scaler=scaler)
            scaler.scale(layer(torch.ones(2, 4)).pow(2).sum() * 1e6).backward()
            assert optimizer_step(SimpleNamespace(scaler=scaler), optimizer) is overflows
            assert torch.equal(layer.weight, before) is overflows
            optimizer.zero_grad()
    finally:
        reset_accelerate_state()


def test_bf16_or_fp16_from_a_launcher_config_is_checked_as_the_flag_is(monkeypatch, tmp_path):
    """The shipped single/multi-GPU YAMLs set mixed_precision: bf16 for the launcher, and the original's
    zero_stage2_config.json has fp16.enabled: true; with --mixed_precision auto both went unchecked: emulated bf16
    on a V100, a traceback from DeepSpeed for fp16 on the CPU. Each is one line naming where it was asked."""
    import json

    from utils import train_setup

    ds = {"fp16": {"enabled": True}, "bf16": {"enabled": "auto"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"the DeepSpeed config's fp16.enabled: true: fp16 needs a CUDA GPU"):
        train_setup._resolve_mixed_precision("auto", deepspeed=True, ds_config=ds)
    assert train_setup._resolve_mixed_precision("auto", True, {"fp16": {"enabled": "auto"}}) is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert train_setup._resolve_mixed_precision("auto", deepspeed=False) is None  # the CPU has bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(UserError, match=r"the accelerate config's mixed_precision: bf16: this GPU \(Tesla T4\) has "
                                        r"no native bfloat16"):
        train_setup._resolve_mixed_precision("auto", deepspeed=False)
    assert train_setup._resolve_mixed_precision("no", deepspeed=False) == "no"  # the flag overrides the launcher
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**json.loads((ROOT / "config_files/zero_stage2_config.json").read_text())}))
    argv = ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--path_to_ds_config",
            str(path), "--log_dir", str(tmp_path / "run")]
    from utils.train_args import build_parser, config_from_namespace

    config = config_from_namespace(build_parser("peft").parse_args(argv), "peft")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train_setup.make_accelerator(config)


def test_deepspeeds_ops_are_built_once_by_the_venvs_ninja_in_the_venvs_own_cache(tmp_path, monkeypatch):
    """The system's ninja and the venv's read each other's build log as changed, and one ~/.cache directory served
    every venv: each switch rebuilt DeepSpeed's CPU ops (3-7 minutes on 2 cores), `make install`'s build included."""
    import sys

    venv, base = tmp_path / "venv", tmp_path / "python"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "ninja").write_text("")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", str(base))
    monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", str(venv / "bin")]))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    venv_extension_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(venv / "torch_extensions")
    assert os.environ["PATH"].split(os.pathsep) == [str(venv / "bin"), "/usr/bin", str(venv / "bin")]
    venv_extension_cache()  # once first, it stays as it is
    assert os.environ["PATH"].split(os.pathsep) == [str(venv / "bin"), "/usr/bin", str(venv / "bin")]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/where/the/user/said")
    venv_extension_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/where/the/user/said"
    for name, value in (("base_prefix", str(venv)),  # no venv (a Docker image's Python): torch's defaults
                        ("prefix", "/a/venv/this/user/cannot/write/to")):
        with monkeypatch.context() as other:
            other.setattr(sys, name, value)
            other.delenv("TORCH_EXTENSIONS_DIR")
            other.setenv("PATH", "/usr/bin")
            venv_extension_cache()
            assert "TORCH_EXTENSIONS_DIR" not in os.environ and os.environ["PATH"] == "/usr/bin"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    from utils import train_setup
    from utils.train_args import build_parser, config_from_namespace

    path = tmp_path / "ds.json"  # refused before any Accelerator is made, after the cache is chosen
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    config = config_from_namespace(build_parser("peft").parse_args(
        ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--path_to_ds_config", str(path),
         "--log_dir", str(tmp_path / "run")]), "peft")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train_setup.make_accelerator(config)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(venv / "torch_extensions")


def test_a_venv_without_its_own_ninja_keeps_the_path_and_still_gets_its_own_cache(tmp_path, monkeypatch):
    """Only the venv's own ninja is put first on PATH: a venv without one (a shared system ninja) leaves PATH as the
    user set it, while the extension cache still moves into the venv."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "python"))
    monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    venv_extension_cache()
    assert os.environ["PATH"] == "/usr/bin"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(venv / "torch_extensions")


def test_skipped_cuda_graphs_are_counted_from_torchs_counter_and_logged(caplog):
    """--compile_mode reduce-overhead: torch runs a compiled graph without its CUDA graph silently (its reasons go to
    an artifact logger that is off by default); the trainer's end-of-run line says how many, from torch's counter."""
    import logging
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from utils import fast_paths, training

    before = fast_paths.cudagraph_skips()
    counters["inductor"]["cudagraph_skips"] += 3
    try:
        assert fast_paths.cudagraph_skips() - before == 3
    finally:
        counters["inductor"]["cudagraph_skips"] -= 3
    log = logging.getLogger("test-cudagraph-skips")
    with caplog.at_level(logging.INFO, logger=log.name):
        training.Trainer._log_cudagraph_skips(SimpleNamespace(log=log), 3)
        training.Trainer._log_cudagraph_skips(SimpleNamespace(log=log), 0)
    (warning, info), = [tuple(r for r in caplog.records)]
    assert warning.levelno == logging.WARNING and "ran 3 compiled graphs without CUDA graphs" in warning.getMessage()
    assert info.levelno == logging.INFO and "no compiled graph skipped its CUDA graph" in info.getMessage()


def test_a_log_line_goes_above_the_progress_bar_not_onto_its_line(monkeypatch):
    """The console handler writes through tqdm: the bar is cleared before the line and drawn again after it at its
    latest step (before: "...it/s]2026-11-28 ... epoch 1: mean loss" on the bar's line, the bar one step short)."""
    import io
    import sys

    from utils.train_logging import ProgressBar, setup_logging

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    log = setup_logging(None, is_main=True)
    bar = ProgressBar(total=2, initial=0, enabled=True)
    bar.update({"loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0})
    bar.update({"loss": 0.5, "lr": 1e-3, "tokens_per_s": 10.0})
    log.info("epoch 1: mean loss 0.75")
    bar.close()
    setup_logging(None, is_main=True)
    out = err.getvalue()
    before, line, after = out.partition(" INFO epoch 1: mean loss 0.75\n")
    assert line, out
    assert before.rsplit("\r", 1)[-1].startswith("20"), before  # the line starts a line of its own (a timestamp)
    assert before.rsplit("\r", 2)[-2].strip() == "", before  # the bar was cleared first
    assert "2/2" in after, after  # and drawn again, at its last step


def test_memory_need_counts_weights_and_the_trained_tensors_gradients_and_adamw_states():
    """FFT trains every fp32 weight: 4 bytes of weight, gradient and each AdamW state per parameter (phi-2's 2.78 B
    parameters: 41.4 GiB before activations, so a 40 GB card cannot hold them); PT trains only its soft prompt."""
    from custom_peft import build_model
    from utils.models import load_foundation_model
    from utils.train_setup import MemoryNeed

    with torch.device("meta"):
        lm, _ = load_foundation_model("phi-2", dtype="fp32", random_weights=True, seed=0)
    params = sum(p.numel() for p in lm.parameters())
    need = MemoryNeed.of(lm)
    assert (need.weights, need.gradients, need.adamw_states) == (4 * params, 4 * params, 8 * params)
    assert round(need.total / 2**30, 1) == 41.4
    model, _ = build_model("pt", "tiny-llama", num_virtual_tokens=4, dtype="bf16", seed=0)
    prompt = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    need = MemoryNeed.of(model)
    assert prompt and (need.weights, need.gradients, need.adamw_states) == (2 * frozen + 4 * prompt, 4 * prompt,
                                                                            8 * prompt)


@pytest.mark.parametrize("method, dtype, way_out", [
    ("fft", "fp32", "accelerate launch --config_file config_files/config_ds_zero3_fft.yaml --num_processes 1 "
                    "tune_fft_baseline.py"),  # the YAML says 4 processes: this check runs with one GPU
    ("lopa", "fp32", "--model_dtype bf16 halves the frozen weights (the trained tensors stay fp32)"),
    ("lopa", "bf16", "use a GPU with more memory, or a smaller --model_type"),
])
def test_a_run_whose_weights_and_optimizer_cannot_fit_the_gpu_is_refused_before_it_moves(method, dtype, way_out):
    from utils.train_setup import MemoryNeed, check_fits_gpu

    gib = 2**30
    need = MemoryNeed(10 * gib, 10 * gib, 20 * gib) if method == "fft" else MemoryNeed(30 * gib, 0, 0)
    with pytest.raises(UserError) as exc:
        check_fits_gpu(need, int(need.total - gib), method, "m", dtype)
    assert str(exc.value).startswith(
        f"{'full fine-tuning' if method == 'fft' else method} of m needs {need.total / gib:.1f} GiB before activations")
    assert f"more than the {need.total / gib - 1:.1f} GiB free on this GPU" in str(exc.value)
    assert str(exc.value).endswith(way_out + (" ... (docs/TRAINING.md)" if method == "fft" else ""))
    close = check_fits_gpu(need, int(need.total / 0.95), method, "m", dtype)  # under a tenth left: a warning
    assert close is not None and "an out-of-memory error is likely" in close and way_out in close
    assert check_fits_gpu(need, int(need.total / 0.85), method, "m", dtype) is None


def test_the_memory_check_leaves_the_free_memory_less_the_need_and_reads_small_sizes_in_mib():
    """The warning's room for the activations is the free memory less the need, each part in its own size; a size
    under a tenth of a GiB reads in MiB (a tiny model's "0.0 GiB" says nothing)."""
    from utils.train_setup import MemoryNeed, check_fits_gpu

    gib, mib = 2**30, 2**20
    warning = check_fits_gpu(MemoryNeed(6 * gib, 2 * gib, 4 * gib), int(12.5 * gib), "lopa", "m", "bf16")
    assert warning.startswith("lopa of m needs 12.0 GiB before activations (weights 6.0 GiB, gradients 2.0 GiB, AdamW "
                              "states 4.0 GiB), which leaves 0.5 GiB of the GPU's 12.5 GiB free for activations: ")
    with pytest.raises(UserError) as exc:
        check_fits_gpu(MemoryNeed(50 * mib, 0, 0), 40 * mib, "pt", "m", "bf16")
    assert str(exc.value).startswith("pt of m needs 50.0 MiB before activations (weights 50.0 MiB), more than the "
                                     "40.0 MiB free on this GPU")


def test_a_resume_in_another_split_counts_the_epochs_done_steps_in_its_own_micro_batches(caplog):
    """``Trainer._convert_position``: a checkpoint of 2 x 2 after 3 steps of the epoch has taken 6 micro-batches,
    which are 12 of 1 x 4; a position inside a step (never written by the trainer) is refused, naming the split."""
    import logging
    from types import SimpleNamespace

    from utils.training import Trainer

    trainer = SimpleNamespace(saved_split=(2, 2), split=(1, 4), state=SimpleNamespace(batch_in_epoch=6),
                              resume_dir=pathlib.Path("run/checkpoints/step_00000003"), log=logging.getLogger("split"),
                              plan=SimpleNamespace(total_batch_size=4))
    with caplog.at_level(logging.INFO, logger="split"):
        Trainer._convert_position(trainer)
    assert trainer.state.batch_in_epoch == 12
    assert caplog.messages == ["resuming with micro-batch 1 x 4 accumulation steps instead of 2 x 2: the same 4 "
                               "examples per step"]
    trainer.state.batch_in_epoch = 5
    with pytest.raises(UserError, match=r"^run/checkpoints/step_00000003: its batch_in_epoch \(5\) stands inside an "
                                        r"optimizer step; resume with --per_gpu_train_batch_size 2 "
                                        r"--gradient_accumulation_steps 2$"):
        Trainer._convert_position(trainer)


def test_several_processes_stop_at_the_step_whose_numbers_say_one_held_a_signal_and_compare_once_after_the_last():
    """``Trainer._stop_now``: one process stops at its own signal; several at the step whose reduced numbers carried
    one (``_stop_agreed``), and after the last step they reduce their held signals once more (here: the other
    process held one)."""
    import signal
    from types import SimpleNamespace

    from utils.errors import HeldStop
    from utils.training import Trainer

    reductions = []

    def reduce(tensor, reduction):
        reductions.append((tensor.tolist(), reduction))
        return tensor + 1  # the other process held a signal

    held = HeldStop()
    one = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1), _held=held, _stop_agreed=True)
    assert not Trainer._stop_now(one) and not Trainer._stop_now(one, last=True)
    held.signum = signal.SIGTERM
    assert Trainer._stop_now(one)
    two = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce),
                          _held=HeldStop(), _stop_agreed=False)
    assert not Trainer._stop_now(two) and reductions == []  # between steps: the loss's reduction carries it
    assert Trainer._stop_now(two, last=True) and two._stop_agreed and reductions == [([0.0], "sum")]
    assert Trainer._stop_now(two, last=True) and len(reductions) == 1  # agreed already: no second reduction
    quiet = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                                                        reduce=lambda tensor, reduction: tensor),
                            _held=HeldStop(), _stop_agreed=False)
    assert not Trainer._stop_now(quiet, last=True)
