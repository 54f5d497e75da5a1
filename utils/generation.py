"""Batched, sharded, reproducible generation for any tuned model: the decoding settings and the loop.

The test set is sorted by prompt length (longest first, so a batch that does not fit shows up at once, and rows
of one batch pad little), dealt round-robin to the processes, and cut into left-padded batches. Each row stops on
its own (``utils.stopping.StopOnText``); results are gathered on every process after each batch, keyed by task
id, so uneven shards never duplicate a prediction.

Greedy decoding (the default) is reproducible and, in fp32, gives the same text at any batch size. For sampling
the global torch RNG is seeded before each batch from ``seed`` and the batch's first task id: a rerun, or a
resumed run, with the same batch size and number of processes draws the same samples; another batch size does
not.
"""
from __future__ import annotations

import json
import math
import pathlib
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import StoppingCriteriaList

from utils.batching import Collator, TaskDataset
from utils.errors import UserError
from utils.stopping import StopOnText
from utils.tasks import CRUXEVAL_MAX_LENGTH, MBPP_MAX_NEW, Task

PAPER_TOP_P = 0.95
HF_DEFAULT_TOP_K = 50
"""transformers' default top-k, which the original's sampling used implicitly."""


@dataclass
class GenConfig:
    """Resolved decoding settings (what ``generate_preds_config.json`` records)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = HF_DEFAULT_TOP_K
    """Only with sampling; 0 turns it off."""
    num_return_sequences: int = 1
    max_new_tokens: int | None = MBPP_MAX_NEW
    """Per-row cap on new tokens; None means no cap besides ``max_total_tokens``."""
    max_total_tokens: int | None = None
    """Cap on prompt + new tokens per row (CRUXEval: 512, as in the paper; virtual tokens not counted)."""
    seed: int = 9876
    stop_sequences: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        self.stop_sequences = tuple(self.stop_sequences)
        if self.num_return_sequences < 1:
            raise UserError(f"--num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise UserError(f"--num_return_sequences {self.num_return_sequences} needs sampling (greedy gives "
                            f"identical copies): add --temperature T or --paper_decoding")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise UserError(f"sampling needs --temperature > 0 and 0 < --top_p <= 1, got {self.temperature} and "
                            f"{self.top_p}")
        if self.max_new_tokens is None and self.max_total_tokens is None:
            raise UserError("give --max_new_tokens: without it nothing bounds the generation")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def budget(self, prompt_len: int) -> int:
        """The most new tokens a row with ``prompt_len`` prompt tokens may get (at least 1)."""
        caps = [c for c in (self.max_new_tokens,
                            None if self.max_total_tokens is None else self.max_total_tokens - prompt_len)
                if c is not None]
        return max(1, min(caps))

    def hf_kwargs(self) -> dict:
        """Sampling keyword arguments for ``generate`` (stopping and lengths are added per batch). One beam always,
        and one sequence per prompt under greedy decoding, whatever the model's own generation config says: a
        ``num_beams`` there made ``generate`` search beams (and fail on the stop check's row count)."""
        if not self.do_sample:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "num_beams": 1,
                    "num_return_sequences": 1}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "num_beams": 1, "num_return_sequences": self.num_return_sequences}

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_gen_config(task: Task, *, paper_decoding: bool = False, do_sample: bool | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       num_return_sequences: int | None = None, max_new_tokens: int | None = None,
                       seed: int = 9876, stop_sequences: Sequence[str] | None = None) -> GenConfig:
    """Decoding settings for ``task`` from the command-line values (None = not given).

    Default: greedy, one sample; MBPP 256 new tokens, CRUXEval up to 512 tokens in all. ``paper_decoding``:
    sampling at the task's paper temperature (MBPP 0.6, CRUXEval 0.2), top-p 0.95, top-k 50, one sample.
    Values given explicitly override those. ``--temperature`` alone turns sampling on (0 means greedy); so does
    ``--do_sample True``, at the task's paper temperature unless one is given. ``--do_sample`` with a temperature
    that says the opposite is an error, as are ``--top_p``/``--top_k`` under greedy decoding.
    """
    # checked here, not only when sampling: a negative or NaN temperature used to mean greedy, inf uniform noise
    if temperature is not None and not 0 <= temperature < math.inf:
        raise UserError(f"--temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:  # it used to turn top-k off silently, as 0 does
        raise UserError(f"--top_k must be >= 0 (0 turns it off), got {top_k}")
    sample = paper_decoding
    if temperature is not None:
        sample = temperature > 0
    if do_sample is not None:
        if do_sample and temperature == 0:
            raise UserError("--do_sample True contradicts --temperature 0; drop one of them")
        if not do_sample and temperature:  # it would decode greedy, ignoring the temperature the user typed
            raise UserError(f"--do_sample False contradicts --temperature {temperature} (which samples); drop one "
                            f"of them")
        sample = do_sample
    given = [f"--{name} {value}" for name, value in (("top_p", top_p), ("top_k", top_k)) if value is not None]
    if given and not sample:  # greedy decoding would ignore them, as --num_return_sequences > 1 is refused
        raise UserError(f"{' and '.join(given)} only shape sampling, and this run decodes greedy; add --do_sample "
                        f"(or --temperature T > 0), or drop them")
    if sample:
        temperature = task.paper_temperature if temperature is None else temperature
        top_p = PAPER_TOP_P if top_p is None and paper_decoding else (1.0 if top_p is None else top_p)
    cfg = GenConfig(
        do_sample=sample,
        temperature=float(temperature) if sample else 1.0,
        top_p=float(top_p) if sample else 1.0,
        top_k=HF_DEFAULT_TOP_K if top_k is None else int(top_k),
        num_return_sequences=1 if num_return_sequences is None else num_return_sequences,
        max_new_tokens=max_new_tokens if (max_new_tokens is not None or not task.is_mbpp) else MBPP_MAX_NEW,
        max_total_tokens=None if task.is_mbpp else CRUXEVAL_MAX_LENGTH,
        seed=seed,
        stop_sequences=task.stop_sequences if stop_sequences is None else tuple(stop_sequences),
    )
    return cfg


# ------------------------------------------------------------------------------------------- scheduling
def length_sorted_order(lengths: Sequence[int]) -> list[int]:
    """Indices longest prompt first; ties keep task order (so the plan is the same on every process)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def shard_batches(lengths: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1
                  ) -> tuple[list[list[int]], int]:
    """``(this process's batches of record indices, number of batch steps every process runs)``.

    Round-robin over the length-sorted order, so every process gets prompts of similar lengths; a process with
    fewer batches joins the remaining gathers with an empty batch.
    """
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    mine = length_sorted_order(lengths)[rank::world_size]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    steps = math.ceil(math.ceil(len(lengths) / world_size) / batch_size) if lengths else 0
    return batches, steps


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer (generate and StopOnText use the same)."""
    ids = set()
    configured = getattr(getattr(model.lm, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return sorted(ids)


def _batch_seed(seed: int, first_task_id: str) -> int:
    return zlib.crc32(f"{seed}:{first_task_id}".encode()) & 0x7FFFFFFF


def generate_batch(model, tokenizer, batch: dict, gen_config: GenConfig, device,
                   generate_kwargs: dict | None = None, decoder=None) -> tuple[list[str], int]:
    """Raw completions for one collated batch (``len(task_ids) × num_return_sequences`` strings, grouped by
    task) and the number of new tokens they hold. ``generate_kwargs``: extra arguments for ``generate`` (e.g. a
    static cache). ``decoder``: a ``utils.decode_loop.GreedyDecoder`` to decode with instead of ``generate``
    (greedy only)."""
    n = gen_config.num_return_sequences if gen_config.do_sample else 1
    prompt_lens = batch["attention_mask"].sum(1).tolist()
    budgets = [gen_config.budget(length) for length in prompt_lens for _ in range(n)]
    eos = _eos_ids(model, tokenizer)
    criterion = StopOnText(tokenizer, gen_config.stop_sequences, budgets, eos)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "enc_input_ids", "enc_attention_mask")
              if k in batch}
    if decoder is not None:
        if gen_config.do_sample:
            raise UserError("--decode_loop own decodes greedily; sampling needs --decode_loop hf")
        new_tokens = model.decode_greedy(decoder, **inputs, max_new_tokens=max(budgets), criterion=criterion,
                                         pad_token_id=tokenizer.pad_token_id)
    else:
        if gen_config.do_sample:
            torch.manual_seed(_batch_seed(gen_config.seed, batch["task_ids"][0]))
        new_tokens = model.generate(**inputs, **gen_config.hf_kwargs(), max_new_tokens=max(budgets),
                                    stopping_criteria=StoppingCriteriaList([criterion]), eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id, **(generate_kwargs or {}))
    rows = criterion.trim(new_tokens)
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return texts, sum(len(r) for r in rows)


# ------------------------------------------------------------------------------------------------ loop
def generate_predictions(model, tokenizer, enc_tokenizer, task: Task, records: Sequence[dict], *, batch_size: int,
                         gen_config: GenConfig, accelerator=None, progress: bool = True,
                         on_batch: Callable[[dict[str, list[str]], int], None] | None = None,
                         generate_kwargs: dict | None = None, pad_to_multiple_of: int | None = None,
                         decoder=None) -> dict[str, list[str]]:
    """``{task_id: [raw completion, …]}`` for ``records`` (the new text, decoded, before any cutting).

    With an ``accelerator`` of several processes the records are sharded and every process returns the full,
    gathered dict. ``on_batch(new_predictions, new_tokens)`` runs on the main process after each gathered batch
    (the caller appends them to its progress file there). ``generate_kwargs`` go to every ``generate`` call;
    ``pad_to_multiple_of`` rounds prompt lengths up (few shapes for a static cache and compiled decoding).
    ``decoder``: decode greedily with ``utils.decode_loop.GreedyDecoder`` instead of ``generate`` (then
    ``generate_kwargs`` are unused). The model must already be on its device.
    """
    from tqdm.auto import tqdm

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = rank == 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    dataset = TaskDataset(task, records, tokenizer, enc_tokenizer, num_virtual_tokens=model.num_virtual_tokens,
                          train=False)
    collate = Collator(tokenizer.pad_token_id, getattr(enc_tokenizer, "pad_token_id", None), padding_side="left",
                       pad_to_multiple_of=pad_to_multiple_of)
    batches, steps = shard_batches(dataset.lengths(), batch_size, rank, world)
    results: dict[str, list[str]] = {}
    bar = tqdm(total=len(records), unit="task", disable=not (progress and is_main), desc=f"generate {task.name}")
    start, total_new = time.perf_counter(), 0
    for step in range(steps):
        local: list[tuple[str, list[str]]] = []
        local_new = 0
        if step < len(batches):
            batch = collate([dataset[i] for i in batches[step]])
            texts, local_new = generate_batch(model, tokenizer, batch, gen_config, device, generate_kwargs, decoder)
            per_task = len(texts) // len(batch["task_ids"])
            local = [(tid, texts[j * per_task:(j + 1) * per_task]) for j, tid in enumerate(batch["task_ids"])]
        gathered = _gather(accelerator, [(local, local_new)]) if world > 1 else [(local, local_new)]
        fresh: dict[str, list[str]] = {}
        for part, new in gathered:
            total_new += new
            for tid, texts in part:
                if tid in results or tid in fresh:
                    raise RuntimeError(f"task {tid} was generated twice (sharding bug)")
                fresh[tid] = texts
        results.update(fresh)
        if is_main and on_batch is not None:
            on_batch(fresh, sum(new for _, new in gathered))
        bar.update(len(fresh))
        bar.set_postfix(new_tok_s=f"{total_new / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    missing = [task.record_id(r) for r in records if task.record_id(r) not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} tasks got no prediction, e.g. {missing[0]}")
    return results


def _gather(accelerator, obj: list) -> list:
    from accelerate.utils import gather_object

    return gather_object(obj)


# ----------------------------------------------------------------------------------------- FFT weights
def read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A single-file state_dict (.safetensors, or a torch .bin/.pt), with DDP/DeepSpeed ``module.`` prefixes and
    the training wrapper's ``backbone.`` (an FFT checkpoint's trainable.safetensors, zero_to_fp32.py's output;
    only when every name carries it) removed."""
    state = _read_tensors(path)
    rename = _checkpoint_names(state)
    return {rename(k): v for k, v in state.items()}


def _read_tensors(path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as exc:  # safetensors raises its own error types for a file that is not one
            raise UserError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a file that is not a checkpoint
            raise UserError(f"{path}: not a readable state_dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (a dict of tensor names to tensors)")
    return state


def _checkpoint_names(names) -> Callable[[str], str]:
    """How a checkpoint whose tensors are ``names`` names them in the model: without DDP/DeepSpeed's ``module.``,
    and without the training wrapper's ``backbone.`` when every name carries it (the whole file is the wrapper's)."""
    plain = [name.removeprefix("module.") for name in names]
    wrapped = bool(plain) and all(name.startswith("backbone.") for name in plain)

    def rename(name: str) -> str:
        name = name.removeprefix("module.")
        return name.removeprefix("backbone.") if wrapped else name

    return rename


_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _shard_index(root: pathlib.Path) -> pathlib.Path | None:
    """The shard index of a checkpoint directory (safetensors' first), or None."""
    return next((root / name for name in _SHARD_INDEXES if (root / name).is_file()), None)


def wrapped_checkpoint(directory) -> tuple[str | None, str | None] | None:
    """``(state_dict file, sharded directory)`` to load ``directory``'s weights with ``load_fft_weights`` when their
    names all carry DDP's ``module.`` or the training wrapper's ``backbone.`` (zero_to_fp32.py's output with a
    config.json copied beside it), which ``from_pretrained`` would match none of, leaving every weight random.
    None otherwise, or when the files cannot be read (``from_pretrained``'s own error says more)."""
    root = pathlib.Path(directory)
    index = _shard_index(root)
    single = None if index else next((root / name for name in ("model.safetensors", "pytorch_model.bin")
                                      if (root / name).is_file()), None)
    try:
        if index is not None:
            names = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        elif single is not None and single.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                names = list(f.keys())
        elif single is not None:  # zero_to_fp32.py without --safe_serialization
            names = list(torch.load(single, map_location="cpu", mmap=True, weights_only=True))
        else:
            return None
    except Exception:  # an unreadable index or file, whatever the library raises
        return None
    if not names or not all(name.startswith(("backbone.", "module.")) for name in names):
        return None
    return (None, str(root)) if index is not None else (str(single), None)


def _shards(directory: str) -> tuple[list[pathlib.Path], Callable[[str], str]]:
    """The shard files of a sharded checkpoint directory (its index's ``weight_map``), and how to rename their
    tensors (``_checkpoint_names`` over the whole index)."""
    root = pathlib.Path(directory)
    index = _shard_index(root)
    if index is None:
        raise UserError(f"--sharded_checkpoint_dir {directory}: no {' or '.join(_SHARD_INDEXES)} (a single file "
                        f"goes to --load_base_from_path)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({root / name for name in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{index}: not a shard index with a weight_map ({type(exc).__name__}: {exc})") from None
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise UserError(f"{index}: lists {len(absent)} shard files that are not there, e.g. {absent[0]}")
    return files, _checkpoint_names(weight_map)


def _shared_with_loaded(lm, state: dict) -> set[str]:
    """Names of ``lm`` whose tensor is also reached by a name in ``state`` (tied weights, loaded through the
    other name). ``_tied_weights_keys`` lists lm_head for every causal LM, tied or not, so it cannot decide."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in [*lm.named_parameters(remove_duplicate=False), *lm.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(tensor), []).append(name)
    return {name for names in names_of.values() if any(n in state for n in names) for name in names}


def load_fft_weights(lm, *, state_dict_file: str | None = None, sharded_dir: str | None = None) -> None:
    """Load a fully fine-tuned checkpoint into ``lm`` (strictly: every weight, no stray names): a single state_dict
    file, or a sharded checkpoint directory (its index and shards, one shard in memory at a time), both named as
    ``read_state_dict_file`` names them (zero_to_fp32.py's shards of a DeepSpeed checkpoint too)."""
    if state_dict_file:
        label, parts = state_dict_file, [read_state_dict_file(state_dict_file)]
    elif sharded_dir:
        files, rename = _shards(sharded_dir)
        label = f"--sharded_checkpoint_dir {sharded_dir}"
        parts = ({rename(k): v for k, v in _read_tensors(f).items()} for f in files)
    else:
        return
    loaded: set[str] = set()
    unexpected: list[str] = []
    for state in parts:
        try:
            unexpected += lm.load_state_dict(state, strict=False).unexpected_keys
        except RuntimeError as exc:  # same names, other shapes
            raise UserError(f"{label}: does not fit --model_type ({str(exc).splitlines()[-1].strip()}); "
                            f"pass the --model_type it was trained from") from exc
        loaded.update(state)
        del state  # before the next shard is read: one in memory at a time
    shared = _shared_with_loaded(lm, loaded)
    missing = [k for k in lm.state_dict() if k not in loaded and k not in shared]
    if missing or unexpected:
        raise UserError(f"{label}: does not fit --model_type ({len(missing)} missing weights, e.g. {missing[:2]}; "
                        f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); pass the --model_type it was trained "
                        f"from")
