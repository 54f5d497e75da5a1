"""Greedy decoding in a loop of our own, which asks the device for the new tokens only every few steps.

``transformers``' ``generate`` waits for the device after every decoding step (it reads whether any row is still
running, and ``StopOnText`` reads the newest tokens), so its Python work for step t+1 cannot overlap step t's GPU
work, which matters on a slow host (on an H100, this loop took 8.2 ms per step against 11.1 at batch 64, its
KV buckets included; BENCHMARKS.md). This loop queues steps without reading back and hands the tokens to
``StopOnText.observe`` every ``check_every`` steps, which judges each step exactly as the per-step check would.
Rows that have stopped keep decoding until the next check; ``StopOnText.trim`` cuts what they made after stopping,
and no row sees another, so greedy decoding gives ``generate``'s tokens (tested in fp32).

What it does per batch: a static KV cache (``utils.fast_paths.StaticCacheSlot``: reused while the batch shape
repeats, so compiled CUDA graphs stay valid; full attention when a sliding window covers it), one eager prefill
over the prompt (and soft prompt), then one forward per new token, compiled with ``mode="reduce-overhead"`` when
asked. With ``kv_bucket`` (default 64) attention reads only the cache positions in use, rounded up to a multiple of
``kv_bucket`` (``BucketedStaticLayer``), instead of the whole cache. The step's batch size, cache length and
attended width are symbolic (``dynamic_shapes``): it compiles once for a whole run, once more for one-row batches
(counted on the CPU), and a GPU records a CUDA graph per batch shape and bucket (that recording's cost is not yet
measured). A batch that outgrows a sliding window (Phi-3 past 2,047 positions) keeps transformers' sliding-window
cache layers, whose Python-int position counter would compile the step again at every step: its steps run eager
(``eager_reason``).
Greedy only: sampling and the model's own logits processors (repetition penalty, bad words, ...) are ``generate``'s;
``check_plain_greedy`` refuses them.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from utils.errors import UserError
from utils.fast_paths import StaticCacheSlot, cache_argument, recompile_room, static_cache_length
from utils.stopping import StopOnText

STEP_COMPILE = {"mode": "reduce-overhead", "dynamic": False}
"""How the decoding step is compiled on a GPU: CUDA graphs; ``dynamic=False`` keeps every size static but those
``GreedyDecoder`` marks symbolic."""

RECOMPILE_LIMIT = 256
"""Compilations of the step allowed. With symbolic shapes a run needs two; without
(``dynamic_shapes=False``) one per batch shape and KV bucket, where torch's default, 8, would silently turn a long
run's later shapes eager: prompts of 64..700 tokens in buckets of 64, times the last batch's smaller size, times the
4-5 KV buckets 256 new tokens cross, exceed it."""

KV_BUCKET = 64
"""Attention reads the cache positions in use rounded up to this (``GreedyDecoder(kv_bucket=...)``)."""


class BucketedStaticLayer(StaticLayer):
    """A full-attention static cache layer whose attention (keys, values and the mask's width) covers only the width
    of ``view_mask``, the 2-D mask of the step in progress, or all ``positions`` when it is None. Writes still go to
    the whole buffer, at the position the layer counts; the caller must keep every written position inside the view.

    The buffer holds one spare position past ``positions``, never written nor attended: a view of a whole buffer is
    contiguous and a view of part of it is not, so a compiled step would specialise on which of the two it got,
    that is on the last bucket. With the spare, no view is the whole buffer, and the view's width can stay symbolic:
    one compilation serves every bucket (``GreedyDecoder(dynamic_shapes=True)``)."""

    view_mask: torch.Tensor | None = None

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len + 1, **kwargs)
        self.positions = max_cache_len

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        width = self.positions if self.view_mask is None else self.view_mask.shape[1]
        return keys[:, :, :width], values[:, :, :width]

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        _, offset = super().get_mask_sizes(query_length, *args, **kwargs)
        return (self.positions if self.view_mask is None else self.view_mask.shape[1]), offset

    def get_max_length(self) -> int:
        return self.positions


def kv_view_refusal(cache) -> str | None:
    """Why ``cache`` cannot give attention a shorter view (None when every layer is a ``BucketedStaticLayer``)."""
    others = sorted({type(layer).__name__ for layer in cache.layers if not isinstance(layer, BucketedStaticLayer)})
    if others:
        return (f"{', '.join(others)} cache layers (a sliding window shorter than the sequence, or another kind than "
                f"full attention) cannot be cut to a bucket: attending over the whole cache")
    return None

# every logits processor transformers 5.24 applies without sampling (GenerationMixin._get_logits_processor)
_PROCESSOR_DEFAULTS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                       "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                       "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                       "forced_eos_token_id": (None,), "sequence_bias": (None,), "min_length": (None, 0),
                       "min_new_tokens": (None, 0), "renormalize_logits": (None, False),
                       "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
                       "encoder_repetition_penalty": (None, 1.0), "remove_invalid_values": (None, False),
                       "watermarking_config": (None,)}


def greedy_changes(generation_config) -> list[str]:
    """The settings (``name=value``) of a generation config that make ``generate``'s greedy picks differ from a
    plain argmax; empty when there are none."""
    return [f"{k}={getattr(generation_config, k, None)!r}" for k, ok in _PROCESSOR_DEFAULTS.items()
            if getattr(generation_config, k, None) not in ok]


def own_loop_chosen(choice: str, *, fast: bool, device_type: str, do_sample: bool, generation_config) -> bool:
    """Whether ``generate_preds.py --decode_loop choice`` decodes in this loop. ``auto`` picks it where it was
    checked against ``generate`` and gains: greedy decoding with fast decoding on a GPU (on an H100 it gave the fast
    path's tokens, BENCHMARKS.md), for a model whose generation config sets no logits processor."""
    if choice != "auto":
        return choice == "own"
    return fast and device_type == "cuda" and not do_sample and not greedy_changes(generation_config)


def check_plain_greedy(generation_config) -> None:
    """Refuse a model whose generation config would make ``generate``'s greedy picks differ from a plain argmax."""
    changed = greedy_changes(generation_config)
    if changed:
        raise UserError(f"--decode_loop own decodes with a plain argmax, but this model's generation config sets "
                        f"{', '.join(changed)}; use --decode_loop hf")


class GreedyDecoder:
    """Greedy decoding of left-padded batches; one instance serves a whole run (it keeps the cache and the compiled
    step between batches). ``compile_kwargs``: ``torch.compile`` arguments for the decoding step, or None for eager.
    """

    def __init__(self, check_every: int = 8, compile_kwargs: dict | None = None, kv_bucket: int | None = KV_BUCKET,
                 dynamic_shapes: bool = True):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if kv_bucket is not None and kv_bucket < 0:
            raise ValueError(f"kv_bucket must be >= 1 (or 0/None for the full cache), got {kv_bucket}")
        self.check_every = check_every
        self.compile_kwargs = compile_kwargs
        self.kv_bucket = kv_bucket or None
        self.dynamic_shapes = dynamic_shapes
        """Whether the compiled step's batch size, cache length and attended width are symbolic: one compilation
        serves them all (one more for one-row batches, which torch specialises), CUDA graphs are still recorded per
        shape. False: one compilation per shape, as ``compile_kwargs``' ``dynamic=False`` alone gives."""
        self._step = None
        self._lm = None
        self._caches = self._new_slot()
        self.step_shapes: set[tuple[int, int, int]] = set()
        """(batch, cache length, attended length) of the decoding steps run so far: one CUDA graph each (and one
        compilation each without ``dynamic_shapes``)."""
        self.full_view_reason: str | None = None
        """Why the last batch attended over the whole cache although ``kv_bucket`` is set (None: it did not)."""
        self.eager_reason: str | None = None
        """Why the last batch's steps ran eager although ``compile_kwargs`` is set (None: they did not). A cache
        layer other than ``BucketedStaticLayer`` (a sliding window the sequence outgrows) counts positions in a
        Python int, which would compile the step again at every step."""

    @staticmethod
    def _new_slot() -> StaticCacheSlot:
        return StaticCacheSlot(BucketedStaticLayer)

    @property
    def caches(self) -> StaticCacheSlot:
        """The static cache in use, with the (batch, cache length) shapes decoded so far."""
        return self._caches

    def _forward(self, lm):
        if self._lm is not lm:
            self._lm, self._caches = lm, self._new_slot()
            code = _step if self.dynamic_shapes else _step_per_shape  # torch keeps graphs per code object
            self._step = code if self.compile_kwargs is None else torch.compile(code, **self.compile_kwargs)
        return self._step

    @torch.no_grad()
    def decode(self, lm, inputs: dict, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               max_new_tokens: int, criterion: StopOnText, pad_token_id: int = 0,
               logits_out: list | None = None) -> torch.Tensor:
        """New tokens ``(B, T)`` with ``T <= max_new_tokens``, for ``inputs`` (``input_ids`` or ``inputs_embeds``)
        with their 2-D ``attention_mask`` and ``position_ids``. ``criterion`` decides, as in ``generate``, where
        each row ends (``criterion.trim`` cuts the result); the loop ends once it says every row has stopped.
        ``logits_out``: a list that gets each step's fp32 logits ``(B, V)``, as ``generate``'s ``output_logits``
        (for checks; a copy per step)."""
        check_plain_greedy(lm.generation_config)
        step = self._forward(lm)
        batch, prompt = attention_mask.shape
        length = static_cache_length(prompt + max_new_tokens)
        first = next(iter(inputs.values()))
        dtype = inputs["inputs_embeds"].dtype if "inputs_embeds" in inputs else lm.dtype
        cache = self._caches.get(lm.config, batch, length, dtype, first.device)
        # slots past the prompt are marked attended from the start: the causal mask hides those not yet written
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, length - prompt)], dim=1)
        refusal = kv_view_refusal(cache)
        self.full_view_reason = refusal if self.kv_bucket else None
        self.eager_reason = refusal if self.compile_kwargs is not None else None
        if refusal:
            step, view = _step, lambda used: mask
        else:
            view = self._views(cache, mask)
        name = cache_argument(lm)
        out = lm(**inputs, attention_mask=view(prompt), position_ids=position_ids, use_cache=True, logits_to_keep=1,
                 **{name: cache})
        mark = _mark_dynamic if self.dynamic_shapes else _keep_static
        for layer in cache.layers:  # the buffers exist once the prefill has written to them
            for buffer in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(buffer, torch.Tensor):
                    mark(buffer, 0, 2)
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=first.device)
        tokens[:, 0] = out.logits[:, -1].argmax(-1)
        if logits_out is not None:
            logits_out.append(out.logits[:, -1].float())
        del out
        last_position = position_ids[:, -1:]
        checked = 0  # steps judged so far
        made = 1
        with recompile_room(RECOMPILE_LIMIT), _one_graph_per_shape_expected():
            while made < max_new_tokens:
                if made - checked >= self.check_every:
                    if self._check(tokens, criterion, checked, made):
                        return tokens[:, :made]
                    checked = made
                step_mask = view(prompt + made)  # the new token goes to cache position prompt + made - 1
                self.step_shapes.add((batch, length, step_mask.shape[1]))
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output is dead: reuse its memory
                step_ids = mark(tokens[:, made - 1:made].clone(memory_format=torch.contiguous_format), 0)
                picked, logits = step(lm, step_ids, mark(step_mask, 0, 1), mark(last_position + made, 0), cache, name)
                tokens[:, made] = picked
                if logits_out is not None:  # copied now: the next CUDA-graph replay overwrites the output
                    logits_out.append(logits.float().clone())
                del picked, logits
                made += 1
        self._check(tokens, criterion, checked, made)
        return tokens[:, :made]

    def _views(self, cache, mask: torch.Tensor):
        """A function of the positions in use that sets the cache layers' view (every one a ``BucketedStaticLayer``)
        and returns the 2-D mask cut to it (the whole cache when bucketing is off)."""
        length = mask.shape[1]
        masks: dict[int, torch.Tensor] = {}  # one contiguous mask per bucket, reused by every step in it
        layers = cache.layers
        bucket = self.kv_bucket or length  # no bucketing: one view, the whole cache, still of a symbolic width

        def view(used: int) -> torch.Tensor:
            width = min(length, -(-used // bucket) * bucket)
            if width not in masks:
                masks[width] = mask[:, :width].contiguous()
            if layers[0].view_mask is not masks[width]:
                for layer in layers:
                    layer.view_mask = masks[width]
            return masks[width]

        return view

    @staticmethod
    def _check(tokens: torch.Tensor, criterion: StopOnText, checked: int, made: int) -> bool:
        offset = max(0, checked + 1 - criterion.window)
        return criterion.observe(tokens[:, offset:made].tolist(), offset, checked)  # the one host sync


def _one_graph_per_shape_expected():
    """Within the block, torch records a CUDA graph for each new shape of a step compiled with symbolic shapes without
    warning past 8 (as it otherwise does): one per batch shape and KV bucket is this loop's design."""
    import torch._inductor.config

    return torch._inductor.config.patch({"triton.cudagraph_dynamic_shape_warn_limit": None})


def _step_per_shape(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache,
                    cache_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``_step`` for ``dynamic_shapes=False``, under a code object of its own: torch keeps compiled graphs per code
    object and lets a graph serve any call its guards accept, so the two would otherwise serve each other's calls
    (a symbolic graph taking the per-shape decoder's)."""
    return _step(lm, input_ids, attention_mask, position_ids, cache, cache_name)


def _mark_dynamic(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    """``tensor``, its ``dims`` marked for a compiled step to treat as symbolic where the step allows (no error where
    it specialises one, as it does a size of 1)."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def _keep_static(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    return tensor


def _step(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache,
          cache_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: each row's greedy next token, and the logits it was picked from. A function of its own, so
    that its compilations are counted apart from those of ``generate``'s compiled forward (torch caps them per
    function)."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **{cache_name: cache}).logits[:, -1]
    return logits.argmax(-1), logits
