"""One model object for all six methods: forward with labels, and cache-correct batched ``generate``.

A soft prompt (PT's shared one, or LOPA's / IDPG's per-instance one) is prepended to the input embeddings with
m ones in the attention mask and m -100 labels. Generation passes those embeddings and the mask straight to the
base model's own ``generate``: no patched ``prepare_inputs_for_generation``, no decoding state kept on the model
between calls (only, for a sliding-window model, a static cache buffer to reuse). Position ids are computed from
the mask (in ``forward``, and passed explicitly to ``generate``, which extends them by one per new token), so left
padding does not shift them.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from custom_peft.packing import attention_width_constant, pack, plan_rows
from utils.batching import IGNORE_INDEX


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … over attended tokens only; padded slots get 0, as ``generate`` itself does (their value never
    reaches an attended token)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class TunedModel(nn.Module):
    """A foundation model tuned (or not) by one method.

    ``backbone``: the Hugging Face causal LM, or the ``peft.PeftModel`` around it for ``lora`` and ``pt``.
    ``prompt``: the instance-prompt module for ``lopa`` and ``idpg`` (None otherwise).
    ``meta``: what the adapter config records (method, m, r, encoder, base model, width).
    ``enc_tokenizer``: the encoder's tokenizer, for ``lopa`` and ``idpg`` (None otherwise).
    """

    def __init__(self, method: str, backbone: nn.Module, prompt: nn.Module | None = None, meta: dict | None = None,
                 enc_tokenizer=None):
        super().__init__()
        self.method = method
        self.backbone = backbone
        self.prompt = prompt
        self.meta = dict(meta or {})
        self.enc_tokenizer = enc_tokenizer
        self.selective_logits = True
        """Project to the vocabulary only where a label is supervised (same loss, far less memory)."""
        self.packing = False
        """With labels, lay a padded batch's examples end to end in fewer rows when that costs less
        (``custom_peft.packing``; same loss). The trainer turns it on."""
        self._attention_width: float | None = None
        self._static_caches = None
        """``utils.fast_paths.StaticCacheSlot`` for a sliding-window model's fast decoding, made on first use."""

    # ------------------------------------------------------------------------------------------ parts
    @property
    def lm(self) -> nn.Module:
        """The Hugging Face causal LM (with LoRA layers injected in place for ``lora``)."""
        get_base = getattr(self.backbone, "get_base_model", None)
        return get_base() if get_base is not None else self.backbone

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.meta.get("num_virtual_tokens", 0)) if self.method in ("pt", "lopa", "idpg") else 0

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def prompt_embeds(self, batch_size: int, enc_input_ids=None, enc_attention_mask=None) -> torch.Tensor | None:
        """The B×m×d soft prompt for this batch, or None for methods without one."""
        if self.method == "pt":
            return self.backbone.get_prompt(batch_size=batch_size)
        if self.prompt is not None:
            return self.prompt(enc_input_ids, enc_attention_mask)
        return None

    def _embed_inputs(self, input_ids, attention_mask, enc_input_ids, enc_attention_mask):
        """``(inputs_embeds, attention_mask)`` with the soft prompt in front, or None when there is none."""
        prompt = self.prompt_embeds(input_ids.shape[0], enc_input_ids, enc_attention_mask)
        if prompt is None:
            return None
        tokens = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompt.to(tokens.dtype), tokens], dim=1)
        ones = attention_mask.new_ones(input_ids.shape[0], prompt.shape[1])
        return embeds, torch.cat([ones, attention_mask], dim=1)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                enc_input_ids: torch.Tensor | None = None, enc_attention_mask: torch.Tensor | None = None,
                **_ignored) -> CausalLMOutputWithPast:
        """Mean cross-entropy over supervised tokens when ``labels`` is given; logits cover the input only
        when no labels are given (or ``selective_logits`` is off)."""
        embedded = self._embed_inputs(input_ids, attention_mask, enc_input_ids, enc_attention_mask)
        if embedded is None:
            # with packing on, embed here whether or not this batch packs: ZeRO-3 gathers weights in the order
            # modules run, which must be the same on every process (they pack different batches differently)
            if labels is not None and self.packing:
                inputs = {"inputs_embeds": self.lm.get_input_embeddings()(input_ids)}
            else:
                inputs = {"input_ids": input_ids}
            mask = attention_mask
        else:
            inputs = {"inputs_embeds": embedded[0]}
            mask = embedded[1]
            if labels is not None:
                pad = labels.new_full((labels.shape[0], mask.shape[1] - labels.shape[1]), IGNORE_INDEX)
                labels = torch.cat([pad, labels], dim=1)
        inputs.update(attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
        packed = labels is not None and self.packing and self._pack(inputs, mask, labels)
        if packed:
            inputs, labels = packed
        if labels is not None and self.selective_logits:
            hidden = self.lm.base_model(**inputs).last_hidden_state
            return CausalLMOutputWithPast(loss=self._selective_loss(hidden, labels))
        out = self.lm(**inputs, labels=labels)
        if packed:  # logits in the packed layout would match no input row
            return CausalLMOutputWithPast(loss=out.loss)
        if embedded is not None:  # drop the virtual-token positions from the returned logits
            out.logits = out.logits[:, -input_ids.shape[1]:]
        return out

    def _pack(self, inputs: dict, mask: torch.Tensor, labels: torch.Tensor) -> tuple[dict, torch.Tensor] | None:
        """``(inputs, labels)`` of the batch packed (``custom_peft.packing``), or None when packing would not save
        work. ``inputs`` / ``labels`` are the padded batch's, virtual tokens included."""
        if self._attention_width is None:
            self._attention_width = attention_width_constant(self.lm)
        rows = plan_rows(mask.sum(1).tolist(), self._attention_width)
        if rows is None:
            return None
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = self.lm.get_input_embeddings()(inputs["input_ids"])
        batch = pack(embeds, mask, labels, rows)
        # no 2-D mask: transformers reads the examples' bounds from the restarting positions
        return ({"inputs_embeds": batch.inputs_embeds, "attention_mask": None, "position_ids": batch.position_ids,
                 "use_cache": False}, batch.labels)

    def _selective_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits.float(), targets[keep])

    # --------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 enc_input_ids: torch.Tensor | None = None, enc_attention_mask: torch.Tensor | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """New tokens only (B·num_return_sequences × T_new), for left-padded ``input_ids``.

        With ``return_dict_in_generate=True`` the Hugging Face output comes back instead, its ``sequences`` holding
        the new tokens only (``scores`` / ``logits`` as ``generate`` gives them). ``max_length`` / ``min_length`` count
        the prompt tokens plus the new ones, never the virtual tokens, so they mean the same for every method. Runs in
        eval mode (no dropout) and restores the previous mode afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            return self._generate(input_ids, attention_mask, enc_input_ids, enc_attention_mask, **generate_kwargs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode_greedy(self, decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      enc_input_ids: torch.Tensor | None = None, enc_attention_mask: torch.Tensor | None = None, *,
                      max_new_tokens: int, criterion, pad_token_id: int = 0, logits_out: list | None = None
                      ) -> torch.Tensor:
        """New tokens only, like ``generate`` with greedy decoding, from ``decoder`` (a ``utils.decode_loop``
        ``GreedyDecoder``); ``criterion`` (``StopOnText``) decides where rows end and ``criterion.trim`` cuts them.
        ``logits_out`` collects each step's logits (``GreedyDecoder.decode``)."""
        was_training = self.training
        self.eval()
        try:
            inputs = self._generation_inputs(input_ids, attention_mask, enc_input_ids, enc_attention_mask)
            mask = inputs.pop("attention_mask")
            return decoder.decode(self.lm, inputs, mask, positions_from_mask(mask), max_new_tokens, criterion,
                                  pad_token_id, logits_out)
        finally:
            self.train(was_training)

    def _generation_inputs(self, input_ids, attention_mask, enc_input_ids, enc_attention_mask) -> dict:
        """The base model's inputs: ids and mask, or the embeddings with the soft prompt in front and its mask."""
        embedded = self._embed_inputs(input_ids, attention_mask, enc_input_ids, enc_attention_mask)
        if embedded is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        return {"inputs_embeds": embedded[0], "attention_mask": embedded[1]}

    def _full_attention_static_cache(self, mask: torch.Tensor, generate_kwargs: dict) -> None:
        """Where ``generate`` was asked for a static cache and the model's sliding window covers the whole sequence
        (Phi-3), pass it a full-attention one instead (``utils.fast_paths.full_attention_config``): transformers'
        own would make its compiled step compile again at every step. Other models keep transformers' cache."""
        from utils.fast_paths import StaticCacheSlot, cache_argument, sliding_window_covers, static_cache_length

        new = generate_kwargs.get("max_new_tokens")
        if generate_kwargs.get("cache_implementation") != "static" or not new:
            return
        length = static_cache_length(mask.shape[1] + new)
        config = self.lm.config
        if not sliding_window_covers(config, length):
            return
        if self._static_caches is None:  # kept between calls, as transformers keeps its own
            self._static_caches = StaticCacheSlot()
        rows = mask.shape[0] * (generate_kwargs.get("num_return_sequences") or 1)
        del generate_kwargs["cache_implementation"]
        cache = self._static_caches.get(config, rows, length, self.lm.dtype, mask.device)
        generate_kwargs[cache_argument(self.lm)] = cache

    def _generate(self, input_ids, attention_mask, enc_input_ids, enc_attention_mask, **generate_kwargs):
        inputs = self._generation_inputs(input_ids, attention_mask, enc_input_ids, enc_attention_mask)
        embedded = "inputs_embeds" in inputs
        if embedded:  # with inputs_embeds alone, decoder-only generate returns just the new tokens
            for key in ("max_length", "min_length"):  # HF counts the m virtual tokens in these; the user's do not
                if generate_kwargs.get(key) is not None:
                    generate_kwargs[key] += inputs["inputs_embeds"].shape[1] - input_ids.shape[1]
        # Explicit positions: the same ones forward uses, whatever a model's own generate would infer.
        generate_kwargs.setdefault("position_ids", positions_from_mask(inputs["attention_mask"]))
        self._full_attention_static_cache(inputs["attention_mask"], generate_kwargs)
        out = self.lm.generate(**inputs, **generate_kwargs)
        if embedded:
            return out
        if isinstance(out, torch.Tensor):
            return out[:, input_ids.shape[1]:]
        out.sequences = out.sequences[:, input_ids.shape[1]:]
        return out
