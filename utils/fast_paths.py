"""Fast hot paths, each behind a switch, each tested to give the plain path's results.

* ``compile_layers``: regional ``torch.compile`` of the decoder layers (one compilation serves every layer, so
  compile time stays short; the model body gains ~1.3-1.4x on a GPU in training). The trainer's ``--compile_mode
  reduce-overhead`` (opt-in) passes ``mode="reduce-overhead"``: the layers replay from CUDA graphs, one per batch
  shape, which ``--pad_to_multiple_of`` keeps few.
* ``compile_encoder_layers``: the same for LOPA's / IDPG's frozen encoder (the trainer's ``--compile_encoder``):
  eager, its ~500 small operations per forward cost the host more than the GPU work they launch.
* ``compile_prompt_heads``: the same for LOPA's / IDPG's trained heads and gate (with ``--compile``).
* ``recompile_room``: lets those compiled layers keep every version they need during a run.
* ``utils.encoder_graphs`` (``--encoder_graphs``, opt-in): the frozen encoder replayed from CUDA graphs instead.
* ``make_adamw``: AdamW with the fused CUDA kernel when the parameters live on a GPU.
* ``static_cache_kwargs``: ``generate`` keyword arguments for a static KV cache, which transformers compiles
  automatically on a GPU (decoding steps only; prefill, where the soft prompt enters, stays eager). A sliding-window
  model (Phi-3) gets a full-attention static cache from ``StaticCacheSlot`` instead (``full_attention_config``), or,
  where the sequence outgrows the window, decodes eager (``TunedModel._full_attention_static_cache``).
* ``utils.decode_loop.GreedyDecoder`` (``--decode_loop``, on a GPU the default for greedy decoding since session
  17's check, BENCHMARKS.md; ``hf`` turns it off): greedy decoding that reads the new tokens back
  every few steps instead of every step, its step compiled with CUDA graphs on a GPU, its attention over the cache
  positions in use rounded up to 64 (``kv_bucket``).
* ``selective_logits`` (in ``TunedModel``): the vocabulary projection only where a label is supervised.
* ``packing`` (in ``TunedModel``, ``custom_peft/packing.py``): padding-free training rows where they cost less.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import StaticCache


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks of a Hugging Face causal LM (``model.layers``, ``transformer.h``, ...; OPT's
    ``model.decoder.layers`` one level down): a ModuleList of ``num_hidden_layers`` modules, the body's own first,
    then the outermost nested one."""
    body = lm.base_model
    n_layers = getattr(lm.config, "num_hidden_layers", None) or getattr(lm.config, "n_layer", None)
    for module in [*body.children(), *body.modules()]:  # modules(): pre-order, so outer lists before experts'
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"could not find the decoder layers of {type(lm).__name__}")


def compile_layers(lm: nn.Module, **compile_kwargs) -> int:
    """Compile each decoder layer in place (``nn.Module.compile``); returns how many were compiled."""
    return _compile_each(decoder_layers(lm), compile_kwargs)


def _compile_each(layers: nn.ModuleList, compile_kwargs: dict) -> int:
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The repeated blocks of an encoder backbone (RoBERTa/BERT ``encoder.layer``, CodeSage ``h``)."""
    n_layers = getattr(backbone.config, "num_hidden_layers", None)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"could not find the layers of encoder {type(backbone).__name__}")


def compile_encoder_layers(backbone: nn.Module, **compile_kwargs) -> int:
    """Compile each layer of a frozen encoder in place; returns how many. The trainer does it with its decoder
    layers (``--compile_encoder``); on an H100 it saved LOPA 6.6 ms per step on deepseek-1.3b (BENCHMARKS.md)."""
    return _compile_each(encoder_layers(backbone), compile_kwargs)


def compile_prompt_heads(prompt: nn.Module, **compile_kwargs) -> bool:
    """Compile the trained part of an instance-dependent prompt (LOPA's heads and gate, IDPG's head), the few dozen
    eager operations per step around the encoder; returns whether ``prompt`` has such a part."""
    if not hasattr(prompt, "compile_heads"):
        return False
    prompt.compile_heads(**compile_kwargs)
    return True


TRAIN_RECOMPILE_LIMIT = 64
"""Compiled versions a training run may keep of each compiled function. Every transformers layer class, decoder or
encoder, runs one wrapper's code (``GradientCheckpointingLayer``, transformers 5.24; 5.17 compiles each class's
``forward``), and torch caps the versions of one code at 8 by default. Measured on the CPU (5.24), LOPA with both
compiled kept 7 over the MBPP train split at batch 4 in the trainer, and 8 once a one-example batch followed: the
first shape, then dynamic ones, one-row batches, with and without a mask, for the decoder and for the encoder under
no_grad. Past the cap, torch warns and new versions run eager."""


@contextlib.contextmanager
def recompile_room(limit: int):
    """Within the block, torch.compile keeps up to ``limit`` versions of each function (never fewer than set)."""
    with torch._dynamo.config.patch(recompile_limit=max(limit, torch._dynamo.config.recompile_limit)):
        yield


def release_compiled() -> None:
    """Free compiled models that are no longer used: reset torch.compile's caches, then collect, then return CUDA's
    cached blocks. The order matters: the caches hold compiled layers, which sit in reference cycles (layer -> its
    compiled call -> layer); collected before the reset, they survived in the oldest generation (on an H100 the next
    model's peak carried the previous one's layer weights). The reset also lifts torch's cap of 8 compiled versions
    per function, which every transformers decoder layer's one wrapper shares."""
    import gc

    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cudagraph_skips() -> int:
    """Compiled graphs inductor has run without CUDA graphs under ``mode="reduce-overhead"`` (a process total)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def make_adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
               fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; ``fused=None`` picks the fused kernel when every parameter is on a CUDA device."""
    params = [p for p in params if p.requires_grad]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)


def cache_argument(lm) -> str:
    """The keyword a causal LM's ``forward`` and ``generate`` take a KV cache by: ``cache`` in transformers 5.24 (the
    version requirements.txt pins), ``past_key_values`` in 5.17 (the GPU machine's image), which would swallow an
    unknown ``cache=`` into its ``**kwargs`` and decode without the cache."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


STATIC_CACHE_MULTIPLE = 64
"""Static cache lengths are rounded up to this, so batches of nearby lengths share one compiled shape."""


def static_cache_length(positions: int) -> int:
    """The static cache length for ``positions`` (prompt, soft prompt and new tokens), rounded up."""
    return -(-positions // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE


def sliding_window_covers(config, length: int) -> bool:
    """Whether ``config`` has a sliding window that cannot hide anything in ``length`` positions (and no layer kinds
    besides full and sliding attention), so that full attention computes the same."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ())
    return window is not None and window >= length and kinds <= {"full_attention", "sliding_attention"}


def full_attention_config(config, length: int):
    """``config``, or a copy without its sliding window when the window cannot hide anything in ``length`` positions.

    transformers gives a sliding-window layer (Phi-3's 2,047 tokens) a static cache whose position counter is a Python
    int, which changes every step: a compiled decoding step then compiles again at every step, until torch's limit
    turns it eager. With every sequence shorter than the window, full attention is the same computation, and its
    static cache counts positions in a tensor.
    """
    import copy

    if not sliding_window_covers(config, length):
        return config
    plain = copy.deepcopy(config)
    plain.sliding_window = None
    if getattr(plain, "layer_types", None):
        plain.layer_types = ["full_attention"] * len(plain.layer_types)
    return plain


class StaticCacheSlot:
    """One static KV cache, reused (zeroed) while the batch shape repeats: a new cache means new addresses, which
    CUDA graphs must record again. Masked slots must not keep stale values (NaN/inf times a zero weight is NaN)."""

    def __init__(self, layer_class=None):
        self._layer_class = layer_class
        """A ``StaticLayer`` subclass that replaces each of the cache's full-attention layers (None: keep them)."""
        self._cache = None
        self._key = None
        self.shapes: set[tuple[int, int]] = set()
        """The (batch, cache length) shapes served so far."""
        self.allocations = 0

    def get(self, config, batch: int, length: int, dtype: torch.dtype, device) -> StaticCache:
        from transformers import StaticCache

        key = (batch, length, dtype, str(device))
        if key == self._key:
            self._cache.reset()
        else:
            self._cache = None  # the old one is freed before the new one is allocated
            self._cache = StaticCache(config=full_attention_config(config, length), max_cache_len=length)
            if self._layer_class is not None:
                self._swap_full_attention_layers()
            self._key = key
            self.allocations += 1
        self.shapes.add((batch, length))
        return self._cache

    def _swap_full_attention_layers(self) -> None:
        from transformers.cache_utils import StaticLayer

        # only exact StaticLayers: a sliding-window layer (a subclass) keeps its own class
        self._cache.layers = [self._layer_class(max_cache_len=layer.max_cache_len) if type(layer) is StaticLayer
                              else layer for layer in self._cache.layers]


def static_cache_kwargs(compile_mode: str | None = "reduce-overhead", fullgraph: bool = False) -> dict:
    """Extra ``generate`` kwargs: a static KV cache, compiled decoding when ``compile_mode`` is set.

    transformers compiles only on accelerators; on the CPU the static cache runs eager (same results).
    Keep prompt lengths in few buckets (``Collator(pad_to_multiple_of=...)``) so shapes, hence compilations,
    stay few.
    """
    kwargs: dict = {"cache_implementation": "static"}
    if compile_mode is None:
        kwargs["disable_compile"] = True
    else:
        from transformers.generation.configuration_utils import CompileConfig

        kwargs["compile_config"] = CompileConfig(fullgraph=fullgraph, mode=compile_mode)
    return kwargs
