"""Padding-free training batches: the examples of a padded batch laid end to end in fewer, fuller rows.

Each example keeps its own positions (0, 1, … from its first token, virtual tokens included) and attends only to
itself: transformers builds that block-causal mask from position ids that restart, when no 2-D attention mask is
given. The loss is the same mean over the same supervised tokens, so a step is the same step, with fewer tokens
through the decoder. Whether a batch is packed, and how wide its rows are, is chosen per batch by a cost
estimate: matmul work grows with the tokens in the rows, attention work with tokens × row width, so packing
everything into one long row is not always cheapest, and a batch without padding is never packed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.batching import IGNORE_INDEX
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


def plan_rows(lengths: list[int], c: float) -> list[list[int]] | None:
    """Rows of example indices that cost less than the padded batch, or None when nothing is cheaper.

    Capacities tried: the longest example, then doubling up to everything in one row; each is filled first-fit,
    longest example first.
    """
    if len(lengths) < 2:
        return None
    longest, total = max(lengths), sum(lengths)
    best_cost, best = row_cost(len(lengths), longest, c), None
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    capacity = longest
    while True:
        rows = _first_fit(order, lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = row_cost(len(rows), width, c)
        if cost < best_cost:
            best_cost, best = cost, rows
        if capacity >= total:
            return best
        capacity = min(2 * capacity, total)


@dataclass
class PackedBatch:
    inputs_embeds: torch.Tensor
    """R × W × d: the examples' attended positions end to end; zero vectors fill the end of a short row."""
    position_ids: torch.Tensor
    """R × W: 0, 1, … within each example, so each attends only to itself; 0 at every filler position."""
    labels: torch.Tensor
    """R × W: the examples' labels, -100 on the filler and on each example's first position (nothing in the
    example predicts it: the padded batch never supervises a row's first label either)."""


def pack(embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, rows: list[list[int]]) -> PackedBatch:
    """Lay the attended positions of ``embeds`` (B × T × d, with ``mask`` and ``labels`` B × T) into ``rows``."""
    keep = mask.bool()
    lengths = keep.sum(1).tolist()
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    flat = embeds[keep]
    filler = len(flat)  # index of the zero vector appended below
    width = max(sum(lengths[i] for i in row) for row in rows)
    index, positions, first = [], [], []
    for row in rows:
        r_index, r_pos, r_first = [], [], []
        for i in row:
            if lengths[i]:  # an empty example (all-zero mask) has no first position: past a full row's end
                r_first.append(len(r_index))
            r_index.extend(range(starts[i], starts[i] + lengths[i]))
            r_pos.extend(range(lengths[i]))
        gap = width - len(r_index)
        r_index.extend([filler] * gap)
        r_pos.extend([0] * gap)  # each filler position its own sequence: no position beyond the longest example
        index.append(r_index)
        positions.append(r_pos)
        first.append(r_first)
    device = embeds.device
    index_t = torch.tensor(index, device=device)
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])
    flat_labels = torch.cat([labels[keep], labels.new_full((1,), IGNORE_INDEX)])
    packed_labels = flat_labels[index_t]
    starts_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, cols in enumerate(first):
        starts_mask[r, cols] = True
    packed_labels = packed_labels.masked_fill(starts_mask.to(device), IGNORE_INDEX)
    return PackedBatch(flat[index_t], torch.tensor(positions, device=device), packed_labels)
