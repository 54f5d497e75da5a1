"""The layout of a training batch, planned on the host: padding-free rows, and the positions the loss reads.

Packing lays the examples of a padded batch end to end in fewer, fuller rows. Each example keeps its own positions
(0, 1, … from its first token, virtual tokens included) and attends only to itself (``block_causal_mask``, the mask
transformers builds from position ids that restart). The loss is the same mean over the same supervised tokens, so a
step is the same step, with fewer tokens through the decoder. Whether a batch is packed, and how wide its rows are,
is chosen per batch by a cost estimate: matmul work grows with the tokens in the rows, attention work with tokens ×
row width, so packing everything into one long row is not always cheapest, and a batch without padding is never
packed. A width multiple (``TunedModel.packed_width_multiple``, the trainer's ``--pad_to_multiple_of``) rounds the
packed rows up, with filler, so that packed batches take few shapes, as the collator's rounded padded ones do (CUDA
graphs record one graph per shape).

Everything is worked out from the batch's mask and labels on the CPU (``plan_layout``) and reaches the GPU in one
asynchronous copy (``to_device``): on a GPU, reading a mask back, or indexing with a boolean mask, would make the host
wait for all queued work (docs/TRAINING.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.batching import IGNORE_INDEX, round_up
from utils.models import numel


def attention_width_constant(lm: nn.Module) -> float:
    """Row width at which attention costs as much per token as the matmuls: N / (2·d·L).

    Per token the forward pass costs about 2N FLOPs of matmuls plus 4·d·L·W for attention over a row of W
    positions (a masked attention kernel computes every position of the row, masked or not).
    """
    cfg = lm.config
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    n = sum(numel(p) for p in lm.parameters())
    return n / (2 * d * layers)


def packing_refusal(lm: nn.Module) -> str | None:
    """Why packed rows would not compute what padded rows do for the causal LM ``lm``, or None where they do.

    Packing restarts each example's positions through ``position_ids``; a model body that takes none (ALiBi: Bloom,
    MPT) derives its positions from the attention mask, so a packed example would see the row's earlier ones. This
    reads the signature only: the block mask is either built here (SDPA) or left to transformers, which builds it
    from the positions for most families but not for all (OPT; docs/EXTENDING.md).
    """
    import inspect

    body = lm.base_model
    if "position_ids" not in inspect.signature(body.forward).parameters:
        return (f"{type(body).__name__}.forward takes no position_ids (its positions come from the attention mask, "
                f"as with ALiBi), so the examples of a packed row could not each start at position 0")
    return None


def _first_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        for r, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def row_cost(num_rows: int, width: int, c: float) -> float:
    """Relative cost of ``num_rows`` rows of ``width`` positions (see ``attention_width_constant``)."""
    return num_rows * width * (c + width)


def plan_rows(lengths: list[int], c: float, multiple: int | None = None,
              padded_width: int | None = None) -> list[list[int]] | None:
    """Rows of example indices that cost less than the padded batch, or None when nothing is cheaper.

    Capacities tried: the longest example, then doubling up to everything in one row; each is filled first-fit,
    longest example first. ``multiple``: the packed rows will be as wide as their fullest row rounded up to it
    (``pack_rows``), and each plan is costed at that rounded width; ``padded_width``: the padded batch's own width
    (default: the longest example), which the collator may have rounded too. Rounded widths are what the decoder
    runs: costing plans unrounded would compare packed rows up to ``multiple`` - 1 positions narrower than they
    run with a padded batch costed at its real width. Without a multiple both are the unrounded widths.
    """
    if len(lengths) < 2:
        return None
    longest, total = max(lengths), sum(lengths)
    best_cost, best = row_cost(len(lengths), longest if padded_width is None else padded_width, c), None
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    capacity = longest
    while True:
        rows = _first_fit(order, lengths, capacity)
        width = round_up(max(sum(lengths[i] for i in row) for row in rows), multiple)
        cost = row_cost(len(rows), width, c)
        if cost < best_cost:
            best_cost, best = cost, rows
        if capacity >= total:
            return best
        capacity = min(2 * capacity, total)


@dataclass
class Layout:
    """How one training batch goes through the decoder, planned on the host. CPU tensors, all int64."""

    rows: list[list[int]] | None
    """Packed rows of example indices, or None: the padded batch as it is."""
    full: bool
    """Unpacked and without padding: no mask and no positions needed."""
    longest: int
    """The longest example's attended positions (a sliding window at least this long hides nothing)."""
    index: torch.Tensor | None = None
    """R·W positions of the padded batch, flattened (B·T), that fill the packed rows; B·T means a zero vector
    (filler)."""
    positions: torch.Tensor | None = None
    """R × W: 0, 1, … within each example, so each attends only to itself; 0 at every filler position."""
    labels: torch.Tensor | None = None
    """R × W packed labels: -100 on the filler and on each example's first position (nothing in the example
    predicts it: the padded batch never supervises a row's first label either)."""
    predictors: torch.Tensor | None = None
    """Flattened positions of the rows the decoder runs (packed or padded) whose hidden state predicts a supervised
    token, row by row (the order boolean indexing gives)."""
    targets: torch.Tensor | None = None
    """The tokens they predict."""


def plan_layout(mask: torch.Tensor, labels: torch.Tensor, width_constant: float | None,
                selective: bool = True, width_multiple: int | None = None) -> Layout:
    """The layout of a padded batch (``mask`` and ``labels``: B × T on the CPU, virtual tokens included): packed when
    ``width_constant`` is given and packing costs less (``plan_rows``), with the supervised positions for a selective
    loss when ``selective``. ``width_multiple``: packed rows are rounded up to a multiple of it (few shapes for CUDA
    graphs). No device is involved."""
    keep = mask.bool()
    lengths = keep.sum(1).tolist()
    rows = (plan_rows(lengths, width_constant, width_multiple, mask.shape[1]) if width_constant is not None
            else None)
    layout = Layout(rows=rows, full=rows is None and bool(keep.all()), longest=max(lengths, default=0))
    if rows is not None:
        layout.index, layout.positions, layout.labels = pack_rows(mask, labels, rows, width_multiple)
    if selective:
        run_labels = labels if rows is None else layout.labels
        targets = run_labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        row, col = supervised.nonzero(as_tuple=True)
        layout.predictors = row * run_labels.shape[1] + col
        layout.targets = targets[supervised]
    return layout


def pack_rows(mask: torch.Tensor, labels: torch.Tensor, rows: list[list[int]], multiple: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, positions, labels)`` of ``Layout`` for the attended positions of a padded batch (``mask`` and
    ``labels``: B × T on the CPU) laid into ``rows``, as wide as the fullest row rounded up to ``multiple``. Tensor
    operations over the batch's tokens: the host plans every training step, and token-by-token Python cost it
    milliseconds per step."""
    keep = mask.bool()
    batch, length = mask.shape
    lengths = keep.sum(1).tolist()
    row_of, offset = [-1] * batch, [0] * batch  # each example's row and first position in it
    width = 0
    for r, row in enumerate(rows):
        used = 0
        for i in row:
            row_of[i], offset[i] = r, used
            used += lengths[i]
        width = max(width, used)
    width = round_up(width, multiple)  # the rest of each row is filler, as after a short row's last example
    kept = keep.reshape(-1).nonzero().squeeze(1)  # the attended positions of B·T, example after example
    example = kept // length
    rank = (keep.cumsum(1) - 1).reshape(-1)[kept]  # 0, 1, … within each example
    row_of_t = torch.tensor(row_of)[example]
    placed = row_of_t >= 0
    kept, rank = kept[placed], rank[placed]
    dest = row_of_t[placed] * width + torch.tensor(offset)[example[placed]] + rank
    flat_index = torch.full((len(rows) * width,), batch * length, dtype=torch.long)
    flat_index[dest] = kept
    positions = torch.zeros(len(rows) * width, dtype=torch.long)  # each filler position its own sequence
    positions[dest] = rank
    packed = torch.cat([labels.reshape(-1), labels.new_full((1,), IGNORE_INDEX)])[flat_index]
    packed[dest[rank == 0]] = IGNORE_INDEX  # nothing in an example predicts its first token
    return flat_index, positions.view(len(rows), width), packed.view(len(rows), width)


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Small int64 CPU tensors on ``device`` in one copy. On CUDA the copy is asynchronous from pinned memory: a
    plain copy from the host waits until the GPU has finished all queued work."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def gather_rows(embeds: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """The packed rows' embeddings (``rows`` × W × d) from the padded batch's (B × T × d), filler as zeros."""
    flat = torch.cat([embeds.reshape(-1, embeds.shape[-1]), embeds.new_zeros(1, embeds.shape[-1])])
    return flat.index_select(0, index).view(rows, -1, embeds.shape[-1])


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The 4-D boolean mask (True: attend) of packed rows: causal, within each example (positions restart at 0).
    transformers builds the same from the positions, but asks the device first whether anything is packed."""
    example = (position_ids == 0).cumsum(-1)
    same = example.unsqueeze(-1) == example.unsqueeze(-2)
    return (same & _causal(position_ids.shape[-1], position_ids.device)).unsqueeze(1)


def padded_causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """The 4-D boolean mask (True: attend) of right-padded rows: causal, padded keys hidden. transformers builds the
    same from the 2-D mask, but asks the device first whether the batch has padding."""
    return (_causal(mask.shape[-1], mask.device) & mask.bool().unsqueeze(1)).unsqueeze(1)


def _causal(length: int, device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()
