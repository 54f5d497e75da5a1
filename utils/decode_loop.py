"""Greedy decoding in a loop of our own, which asks the device for the new tokens only every few steps.

``transformers``' ``generate`` waits for the device after every decoding step (it reads whether any row is still
running, and ``StopOnText`` reads the newest tokens), so its Python work for step t+1 cannot overlap step t's GPU
work, which may matter on a slow host (not yet measured on a GPU). This loop queues steps without reading back
and hands the tokens to ``StopOnText.observe`` every ``check_every`` steps, which judges each step exactly as the
per-step check would. Rows that have stopped keep decoding until the next check; ``StopOnText.trim`` cuts what they
made after stopping, and no row sees another, so greedy decoding gives ``generate``'s tokens (tested in fp32).

What it does per batch: a static KV cache (``utils.fast_paths.StaticCacheSlot``: reused while the batch shape
repeats, so compiled CUDA graphs stay valid; full attention when a sliding window covers it), one eager prefill
over the prompt (and soft prompt), then one forward per new token with the full-length attention mask, compiled
with ``mode="reduce-overhead"`` when asked. Greedy only: sampling and the model's own logits processors
(repetition penalty, bad words, ...) are ``generate``'s; ``check_plain_greedy`` refuses them.
"""
from __future__ import annotations

import torch

from utils.errors import UserError
from utils.fast_paths import StaticCacheSlot, cache_argument, static_cache_length
from utils.stopping import StopOnText

STEP_COMPILE = {"mode": "reduce-overhead", "dynamic": False}
"""How the decoding step is compiled on a GPU: CUDA graphs, one per batch shape (as ``generate``'s own)."""

RECOMPILE_LIMIT = 64
"""Compilations of the step allowed (one per batch shape). torch's default, 8, would silently turn a long run's
later shapes eager: prompts of 64..700 tokens in buckets of 64, times the last batch's smaller size, exceed it."""

# every logits processor transformers 5.24 applies without sampling (GenerationMixin._get_logits_processor)
_PROCESSOR_DEFAULTS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                       "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                       "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                       "forced_eos_token_id": (None,), "sequence_bias": (None,), "min_length": (None, 0),
                       "min_new_tokens": (None, 0), "renormalize_logits": (None, False),
                       "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
                       "encoder_repetition_penalty": (None, 1.0), "remove_invalid_values": (None, False),
                       "watermarking_config": (None,)}


def check_plain_greedy(generation_config) -> None:
    """Refuse a model whose generation config would make ``generate``'s greedy picks differ from a plain argmax."""
    changed = [f"{k}={getattr(generation_config, k, None)!r}" for k, ok in _PROCESSOR_DEFAULTS.items()
               if getattr(generation_config, k, None) not in ok]
    if changed:
        raise UserError(f"--decode_loop own decodes with a plain argmax, but this model's generation config sets "
                        f"{', '.join(changed)}; use --decode_loop hf")


class GreedyDecoder:
    """Greedy decoding of left-padded batches; one instance serves a whole run (it keeps the cache and the compiled
    step between batches). ``compile_kwargs``: ``torch.compile`` arguments for the decoding step, or None for eager.
    """

    def __init__(self, check_every: int = 8, compile_kwargs: dict | None = None):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every
        self.compile_kwargs = compile_kwargs
        self._step = None
        self._lm = None
        self._caches = StaticCacheSlot()

    @property
    def caches(self) -> StaticCacheSlot:
        """The static cache in use, with the shapes decoded so far (one compilation, one CUDA graph each)."""
        return self._caches

    def _forward(self, lm):
        if self._lm is not lm:
            self._lm, self._caches = lm, StaticCacheSlot()
            self._step = _step if self.compile_kwargs is None else torch.compile(_step, **self.compile_kwargs)
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
        name = cache_argument(lm)
        out = lm(**inputs, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                 **{name: cache})
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=first.device)
        tokens[:, 0] = out.logits[:, -1].argmax(-1)
        if logits_out is not None:
            logits_out.append(out.logits[:, -1].float())
        del out
        last_position = position_ids[:, -1:]
        checked = 0  # steps judged so far
        made = 1
        limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit):
            while made < max_new_tokens:
                if made - checked >= self.check_every:
                    if self._check(tokens, criterion, checked, made):
                        return tokens[:, :made]
                    checked = made
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output is dead: reuse its memory
                picked, logits = step(lm, tokens[:, made - 1:made].clone(memory_format=torch.contiguous_format),
                                      mask, last_position + made, cache, name)
                tokens[:, made] = picked
                if logits_out is not None:  # copied now: the next CUDA-graph replay overwrites the output
                    logits_out.append(logits.float().clone())
                del picked, logits
                made += 1
        self._check(tokens, criterion, checked, made)
        return tokens[:, :made]

    @staticmethod
    def _check(tokens: torch.Tensor, criterion: StopOnText, checked: int, made: int) -> bool:
        offset = max(0, checked + 1 - criterion.window)
        return criterion.observe(tokens[:, offset:made].tolist(), offset, checked)  # the one host sync


def _step(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache,
          cache_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: each row's greedy next token, and the logits it was picked from. A function of its own, so
    that its compilations are counted apart from those of ``generate``'s compiled forward (torch caps them per
    function)."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **{cache_name: cache}).logits[:, -1]
    return logits.argmax(-1), logits
