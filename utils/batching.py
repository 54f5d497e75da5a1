"""Turn task records into token ids, and examples into padded batches.

Training examples: ``input_ids = prompt + target + EOS`` with labels -100 over the prompt (and, for CRUXEval, over
the EOS, which the original does not supervise); long prompts are cut from the left. Test examples hold the prompt
only. Encoder inputs are the prompt text under the encoder's own tokenizer, keeping its last tokens.
Batches are padded to their longest row (dynamic padding) unless a fixed length is asked for. Training draws its
examples in the order of ``EpochSampler`` (or ``LengthGroupedSampler``), cut to ``--max_length`` by ``shorten``.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from utils.tasks import Task

IGNORE_INDEX = -100
MAX_ENCODER_TOKENS = 512


def encoder_ids(text: str, enc_tokenizer, max_tokens: int = MAX_ENCODER_TOKENS) -> list[int]:
    """The prompt under the encoder tokenizer: its last tokens, wrapped in CLS/SEP when the tokenizer has both."""
    ids = enc_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # cut below
    wrap = enc_tokenizer.cls_token_id is not None and enc_tokenizer.sep_token_id is not None
    keep = max(max_tokens - (2 if wrap else 0), 0)
    ids = ids[max(len(ids) - keep, 0):]  # not ids[-keep:]: with keep 0 that is the whole list
    return [enc_tokenizer.cls_token_id] + ids + [enc_tokenizer.sep_token_id] if wrap else ids


def prompt_ids(task: Task, text: str, tokenizer) -> list[int]:
    """Prompt tokens with the tokenizer's own special tokens; CRUXEval always starts with BOS (spec §4.2)."""
    ids = tokenizer(text, verbose=False)["input_ids"]  # longer than the model's limit is fine: callers cut it
    if not task.is_mbpp and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_example(task: Task, record: dict, tokenizer, enc_tokenizer=None, *, num_virtual_tokens: int = 0,
                   train: bool = True) -> dict:
    max_prompt, max_total = task.max_lengths(num_virtual_tokens)
    q = prompt_ids(task, task.prompt(record), tokenizer)[-max_prompt:]
    example = {"task_id": task.record_id(record)}
    if train:
        a = tokenizer(task.target(record), add_special_tokens=False, verbose=False)["input_ids"]
        a = a + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(q) + (a if task.is_mbpp else a[:-1] + [IGNORE_INDEX])
        ids = q + a
        if task.is_mbpp:  # the answer is cut on the right, as in the original
            ids, labels = ids[:max_total], labels[:max_total]
        else:  # CRUXEval keeps the end (the answer) and drops the start of the prompt
            ids, labels = ids[-max_total:], labels[-max_total:]
        example.update(input_ids=ids, labels=labels)
    else:
        example["input_ids"] = q
    if enc_tokenizer is not None:  # the original cut MBPP's encoder input to the FM's prompt budget, CRUXEval's to 512
        example["enc_input_ids"] = encoder_ids(task.prompt(record), enc_tokenizer,
                                               max_prompt if task.is_mbpp else MAX_ENCODER_TOKENS)
    return example


class TaskDataset(Dataset):
    """Encoded examples of one split, computed once up front."""

    def __init__(self, task: Task, records: Sequence[dict], tokenizer, enc_tokenizer=None, *,
                 num_virtual_tokens: int = 0, train: bool = True):
        self.task = task
        self.records = list(records)
        self.examples = [encode_example(task, r, tokenizer, enc_tokenizer, num_virtual_tokens=num_virtual_tokens,
                                        train=train) for r in self.records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


def _pad(rows: list[list[int]], value: int, length: int, side: str) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if side == "left":
            out[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        else:
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _mask(rows: list[list[int]], length: int, side: str) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, length, side)


class HostCopy:
    """A training batch's attention mask and labels on the CPU, as the collator made them, riding along in the batch
    (``Collator(host_copy=True)``) so that the forward plans its layout without reading from the device. A plain
    object: accelerate, DDP and ``pin_memory`` pass it through untouched."""

    __slots__ = ("attention_mask", "labels", "enc_padded")

    def __init__(self, attention_mask: torch.Tensor, labels: torch.Tensor, enc_padded: bool | None = None):
        self.attention_mask, self.labels = attention_mask, labels
        self.enc_padded = enc_padded
        """Whether the encoder's rows are padded (None: no encoder input, or not known)."""

    @classmethod
    def read(cls, attention_mask: torch.Tensor, labels: torch.Tensor) -> HostCopy:
        """Both read back from the device in one copy (for a batch that came without one)."""
        host = torch.stack([attention_mask.to(labels.dtype), labels]).cpu()
        return cls(host[0], host[1])

    def matches(self, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                enc_attention_mask: torch.Tensor | None = None) -> bool:
        """Whether this copy stands for the batch's tensors: the same shapes and, where the batch is on the CPU (read
        without waiting for a device), the same values and encoder padding. On an accelerator only shapes are
        compared: comparing values there would wait for the device, which this copy exists to avoid."""
        if self.attention_mask.shape != attention_mask.shape or (labels is not None
                                                                 and self.labels.shape != labels.shape):
            return False
        if attention_mask.device.type != "cpu":
            return True
        same = [(self.attention_mask, attention_mask)] + ([(self.labels, labels)] if labels is not None else [])
        if not all(mine is theirs or bool((mine == theirs).all()) for mine, theirs in same):
            return False
        return (self.enc_padded is None or enc_attention_mask is None
                or self.enc_padded == (not bool(enc_attention_mask.all())))


def round_up(width: int, multiple: int | None) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (None, 0 or 1: ``width`` itself)."""
    return -(-width // multiple) * multiple if multiple and multiple > 1 else width


class Collator:
    """Pad a list of examples into tensors.

    ``padding_side``: ``right`` for training (labels stay aligned), ``left`` for generation. ``pad_to``: a fixed
    length (the original's behaviour; rows longer than it are an error) instead of the longest row.
    ``pad_to_multiple_of``: round the longest row up (few distinct shapes for compiled kernels and static caches);
    ``prefix_tokens``: positions the model prepends to every row (a soft prompt's m virtual tokens), counted in the
    rounding, so that the decoder's width (m + the row) is the multiple, as a packed row's is.
    The mask is built from positions, not from ids, so an EOS equal to PAD is still attended.
    ``host_copy``: training batches also carry their mask and labels on the CPU (``"host"``: a
    ``HostCopy``), so the model plans each step without reading them back from the GPU.
    """

    def __init__(self, pad_id: int, enc_pad_id: int | None = None, *, padding_side: str = "right",
                 pad_to: int | None = None, pad_to_multiple_of: int | None = None, prefix_tokens: int = 0,
                 host_copy: bool = False):
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        self.pad_id, self.enc_pad_id, self.padding_side, self.pad_to = pad_id, enc_pad_id, padding_side, pad_to
        self.pad_to_multiple_of, self.prefix_tokens = pad_to_multiple_of, prefix_tokens
        self.host_copy = host_copy

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        longest = max(len(r) for r in ids)
        length = (self.pad_to if self.pad_to is not None
                  else round_up(longest + self.prefix_tokens, self.pad_to_multiple_of) - self.prefix_tokens)
        if longest > length:
            raise ValueError(f"a row of {longest} tokens does not fit pad_to={length}")
        batch = {
            "input_ids": _pad(ids, self.pad_id, length, self.padding_side),
            "attention_mask": _mask(ids, length, self.padding_side),
            "task_ids": [e["task_id"] for e in examples],
        }
        if "labels" in examples[0]:
            batch["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX, length, self.padding_side)
        if "enc_input_ids" in examples[0]:
            enc = [e["enc_input_ids"] for e in examples]
            enc_len = max(len(r) for r in enc)
            batch["enc_input_ids"] = _pad(enc, self.enc_pad_id or 0, enc_len, "right")
            batch["enc_attention_mask"] = _mask(enc, enc_len, "right")
        if self.host_copy and "labels" in batch:
            enc_mask = batch.get("enc_attention_mask")
            batch["host"] = HostCopy(batch["attention_mask"], batch["labels"],
                                     None if enc_mask is None else not bool(enc_mask.all()))
        return batch


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort within mega-batches of ``batch_size * group`` by length, so batches pad little.

    Deterministic for (seed, epoch); the batches themselves are shuffled so long rows do not all come first.
    A short batch (when the size does not divide the data) goes last, so every batch a DataLoader cuts from this
    order is one of the length-sorted groups.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        return iter([i for b in full + [b for b in batches if len(b) < self.batch_size] for i in b])


class EpochSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch) alone: identical on every process, untouched by the global RNG."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def supervised_tokens(labels: torch.Tensor, has_soft_prompt: bool) -> torch.Tensor:
    """Tokens the loss averages over, as a 0-d tensor on ``labels``' device (read without waiting for it): every
    label after the first (whose predictor is a virtual token, if any)."""
    supervised = labels != IGNORE_INDEX
    return supervised.sum() if has_soft_prompt else supervised[:, 1:].sum()


def shorten(example: dict, max_length: int) -> dict:
    """Cut a training example to ``max_length`` tokens: the prompt loses tokens on the left (one is kept), then
    the answer on the right."""
    ids, labels = example["input_ids"], example["labels"]
    excess = len(ids) - max_length
    if excess <= 0:
        return example
    prompt_len = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    cut = min(excess, max(prompt_len - 1, 0))
    return {**example, "input_ids": ids[cut:][:max_length], "labels": labels[cut:][:max_length]}
