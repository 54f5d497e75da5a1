"""CUDA graphs of LOPA's / IDPG's frozen encoder (``--encoder_graphs``, opt-in; slower than the compiled encoder).

Why: eager, CodeBERT-base's forward is about 500 small operations, and each costs the host tens of microseconds to
issue, more than the GPU takes to run it (BENCHMARKS.md). A CUDA graph replays the whole forward for the cost of one
launch. The encoder is frozen and runs without gradients, so its forward is a pure function of the batch (and of the
dropout RNG in training, which graphs replay correctly: torch advances the generator at each replay).

How: one graph per (rows, width, padded, train mode, autocast); widths are padded up to a multiple of ``WIDTH_BUCKET``
(with masked pad tokens) so that a run needs few graphs. Inputs are copied into the graph's own buffers, and the
output is copied out, because the next replay overwrites it. The graphs share one memory pool: they never run at
once and keep nothing but their inputs and outputs between replays. Padding up to the bucket gives the same
embeddings as the unpadded rows up to rounding (the pad positions are masked; tested on the CPU).

Measured on an H100 (BENCHMARKS.md, 2026-11-27; LOPA on deepseek-coder-1.3b's architecture, batch 8 x 512): 60.3 ms
per training step, against 49.7 ms with the encoder's layers compiled (``--compile_encoder``, the default) and 56.3 ms
eager. Its kernels took 10.9 ms more GPU time per step than with the compiled encoder, for a reason not known (the
eager encoder's took 0.6 ms more).
"""
from __future__ import annotations

from typing import Callable

import torch

from utils.batching import MAX_ENCODER_TOKENS

WIDTH_BUCKET = 64
"""Encoder widths are padded up to a multiple of this: MBPP's encoder rows (at most 325 - m tokens) then fall in 5
widths, CRUXEval's (at most 512) in 8, each a graph per batch size and mode."""

Encode = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def cuda_capture(run: Callable[[], torch.Tensor], pool):
    """Capture ``run`` in a CUDA graph after one warm-up call (lazy initialisations stay out of the graph); returns
    ``(graph, output)``, the output to be computed by a replay. ``thread_local``: other threads (DDP's NCCL watchdog
    polls its events) may call CUDA during the capture; the trainer's loader pins batches in this thread."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    return graph, out


class _Graph:
    __slots__ = ("graph", "ids", "mask", "out")


class EncoderGraphs:
    """Replays captured graphs of ``encode(input_ids, attention_mask, padded) -> pooled``. ``capture(run, pool) ->
    (graph, output)`` makes a graph whose ``replay()`` computes ``output`` in place; ``pool`` is shared."""

    def __init__(self, encode: Encode, pad_id: int, bucket: int = WIDTH_BUCKET, capture=cuda_capture,
                 max_width: int = MAX_ENCODER_TOKENS):
        self.encode, self.pad_id, self.bucket, self.capture, self.max_width = encode, pad_id, bucket, capture, max_width
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture is cuda_capture else None

    def width(self, width: int) -> int:
        """The graph's width for rows of ``width`` tokens: rounded up to the bucket, never past ``max_width``
        unless the rows already are."""
        return min(-(-width // self.bucket) * self.bucket, max(width, self.max_width))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, padded: bool,
                 training: bool) -> torch.Tensor:
        rows, width = input_ids.shape
        target = self.width(width)
        padded = padded or target > width
        device = input_ids.device.type
        key = (rows, target, padded, training, str(input_ids.device), torch.is_autocast_enabled(device),
               torch.get_autocast_dtype(device))
        entry = self.graphs.get(key)
        fresh = entry is None
        if fresh:
            entry = _Graph()
            entry.ids = torch.full((rows, target), self.pad_id, dtype=input_ids.dtype, device=input_ids.device)
            entry.mask = torch.zeros((rows, target), dtype=attention_mask.dtype, device=attention_mask.device)
        entry.ids[:, :width].copy_(input_ids)
        entry.mask[:, :width].copy_(attention_mask)
        if target > width:  # a wider batch before this one left its tokens there: masked pad tokens again
            entry.ids[:, width:].fill_(self.pad_id)
            entry.mask[:, width:].zero_()
        if fresh:  # a capture records the kernels without running them
            entry.graph, entry.out = self.capture(lambda: self.encode(entry.ids, entry.mask, padded), self.pool)
            self.graphs[key] = entry  # only once captured: a failed capture leaves no half-built entry
        entry.graph.replay()
        return entry.out.clone()
