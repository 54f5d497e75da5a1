"""One model object for all six methods: forward with labels, and cache-correct batched ``generate``.

A soft prompt (PT's shared one, or LOPA's / IDPG's per-instance one) is prepended to the input embeddings with
m ones in the attention mask and m -100 labels. Generation passes those embeddings and the mask straight to the
base model's own ``generate``: no patched ``prepare_inputs_for_generation``, no decoding state kept on the model
between calls (only, for a sliding-window model, a static cache buffer to reuse). Position ids are computed from
the mask (in ``forward``, and passed explicitly to ``generate``, which extends them by one per new token), so left
padding does not shift them. In a left-padded batch (generation) the soft prompt goes after the padding, next to its
row's first token as in training: a sliding window counts cache slots, and padding between them would hide it early.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from custom_peft import packing as packing_plan
from custom_peft.packing import (Layout, attention_width_constant, block_causal_mask, gather_rows, padded_causal_mask,
                                 plan_layout, to_device)
from utils.batching import IGNORE_INDEX, HostCopy


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … over attended tokens only; padded slots get 0, as ``generate`` itself does (their value never
    reaches an attended token)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def soft_prompt_after_padding(embeds: torch.Tensor, mask: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds, mask)`` laid out [soft prompt (m), left padding, tokens] rearranged to [padding, soft prompt,
    tokens] per row, on the device (no host sync). Every token keeps its index; an unpadded row is unchanged."""
    pads = (mask[:, m:].cumsum(-1) == 0).sum(-1, keepdim=True)
    j = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    source = torch.where(j < pads, j + m, torch.where(j < pads + m, j - pads, j))
    return embeds.gather(1, source.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])), mask.gather(1, source)


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
        (``custom_peft.packing``; same loss). The trainer turns it on. A model that cannot pack
        (``packing_refusal``: ALiBi) keeps its padded rows all the same."""
        self.packed_width_multiple: int | None = None
        """Packed rows as wide as their fullest row rounded up to a multiple of this (None: not rounded), so that
        packed batches take few shapes, as padded ones do with the collator's ``pad_to_multiple_of``: CUDA graphs
        record one graph per shape. The trainer sets it from ``--pad_to_multiple_of``."""
        self._attention_width: float | None = None
        self._static_caches = None
        """``utils.fast_paths.StaticCacheSlot`` for a sliding-window model's fast decoding, made on first use."""

    # ------------------------------------------------------------------------------------------ parts
    @property
    def lm(self) -> nn.Module:
        """The Hugging Face causal LM (with LoRA layers injected in place for ``lora``)."""
        get_base = getattr(self.backbone, "get_base_model", None)
        return get_base() if get_base is not None else self.backbone

    @functools.cached_property
    def packing_refusal(self) -> str | None:
        """Why this model's rows cannot be packed (``custom_peft.packing.packing_refusal``), or None; read once."""
        return packing_plan.packing_refusal(self.lm)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.meta.get("num_virtual_tokens", 0)) if self.method in ("pt", "lopa", "idpg") else 0

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def prompt_embeds(self, batch_size: int, enc_input_ids=None, enc_attention_mask=None,
                      enc_padded: bool | None = None) -> torch.Tensor | None:
        """The B×m×d soft prompt for this batch, or None for methods without one. ``enc_padded``: whether the
        encoder rows are padded, when known on the host."""
        if self.method == "pt":
            self._prompt_ids_beside_prompt()
            return self.backbone.get_prompt(batch_size=batch_size)
        if self.prompt is not None:
            return self.prompt(enc_input_ids, enc_attention_mask, enc_padded)
        return None

    def _prompt_ids_beside_prompt(self) -> None:
        """peft keeps PT's virtual-token ids (0..m-1) on the CPU and copies them to the prompt's device in every
        ``get_prompt``; on a GPU such a copy makes the host wait until the device has finished all queued work. They
        are moved once, to where the prompt's weights are, so that copy does nothing (same ids, same prompt)."""
        name = self.backbone.active_adapter
        ids = self.backbone.prompt_tokens[name]
        device = self.backbone.prompt_encoder[name].embedding.weight.device
        if ids.device != device:
            self.backbone.prompt_tokens[name] = ids.to(device)

    def _embed_inputs(self, input_ids, attention_mask, enc_input_ids, enc_attention_mask, enc_padded=None):
        """``(inputs_embeds, attention_mask)`` with the soft prompt in front, or None when there is none."""
        prompt = self.prompt_embeds(input_ids.shape[0], enc_input_ids, enc_attention_mask, enc_padded)
        if prompt is None:
            return None
        tokens = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompt.to(tokens.dtype), tokens], dim=1)
        ones = attention_mask.new_ones(input_ids.shape[0], prompt.shape[1])
        return embeds, torch.cat([ones, attention_mask], dim=1)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                enc_input_ids: torch.Tensor | None = None, enc_attention_mask: torch.Tensor | None = None,
                host: HostCopy | None = None, **_ignored) -> CausalLMOutputWithPast:
        """Mean cross-entropy over supervised tokens when ``labels`` is given; logits cover the input only
        when no labels are given (or ``selective_logits`` is off). ``host``: the batch's mask and labels on the CPU
        (the collator's ``HostCopy``), so that a training forward never waits for the device; without it they are
        read back once. A ``host`` that does not match the batch (``HostCopy.matches``) is not used."""
        if host is not None and not host.matches(attention_mask, labels, enc_attention_mask):
            host = None  # another batch's copy, or tensors changed since: its mask, labels, encoder flag would be stale
        embedded = self._embed_inputs(input_ids, attention_mask, enc_input_ids, enc_attention_mask,
                                      host.enc_padded if host is not None else None)
        if labels is not None:
            return self._loss_forward(input_ids, attention_mask, labels, embedded, host)
        if embedded is None:
            inputs, mask = {"input_ids": input_ids}, attention_mask
        else:
            embeds, mask = soft_prompt_after_padding(*embedded, self.num_virtual_tokens)
            inputs = {"inputs_embeds": embeds}
        out = self.lm(**inputs, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
        if embedded is not None:  # drop the virtual-token positions from the returned logits
            out.logits = out.logits[:, -input_ids.shape[1]:]
        return out

    def _loss_forward(self, input_ids, attention_mask, labels, embedded, host) -> CausalLMOutputWithPast:
        """The training forward: its layout (packed or not, supervised positions) is planned on the host
        (``custom_peft.packing``), and it builds the attention masks itself where transformers would read the
        device to decide, so nothing here waits for the GPU."""
        if host is None:
            host = HostCopy.read(attention_mask, labels)
        host_mask, host_labels = host.attention_mask, host.labels
        if embedded is None:
            # with packing on, embed here whether or not this batch packs: ZeRO-3 gathers weights in the order
            # modules run, which must be the same on every process (they pack different batches differently)
            embeds = self.lm.get_input_embeddings()(input_ids) if self.packing else None
            mask = attention_mask
        else:
            (embeds, mask), m = embedded, self.num_virtual_tokens
            labels = torch.cat([labels.new_full((labels.shape[0], m), IGNORE_INDEX), labels], dim=1)
            host_mask = torch.cat([host_mask.new_ones(host_mask.shape[0], m), host_mask], dim=1)
            host_labels = torch.cat([host_labels.new_full((host_labels.shape[0], m), IGNORE_INDEX), host_labels], 1)
        packs = self.packing and self.packing_refusal is None
        if packs and self._attention_width is None:
            self._attention_width = attention_width_constant(self.lm)
        layout = plan_layout(host_mask, host_labels, self._attention_width if packs else None,
                             self.selective_logits, self.packed_width_multiple)
        own_mask = self._own_masks_exact(layout)
        names = [n for n in ("index", "positions", "labels", "predictors", "targets") if getattr(layout, n) is not None]
        sent = dict(zip(names, to_device([getattr(layout, n) for n in names], input_ids.device))) if names else {}
        inputs: dict = {"use_cache": False}
        if layout.rows is not None:
            positions, labels = sent["positions"], sent["labels"]
            inputs.update(inputs_embeds=gather_rows(embeds, sent["index"], len(layout.rows)), position_ids=positions,
                          attention_mask=block_causal_mask(positions) if own_mask else None)
        else:
            inputs.update({"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds})
            if not layout.full:  # a batch without padding runs causal: no mask, positions 0, 1, …
                inputs.update(position_ids=positions_from_mask(mask),
                              attention_mask=padded_causal_mask(mask) if own_mask else mask)
        if self.selective_logits:
            hidden = self.lm.base_model(**inputs).last_hidden_state
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, sent["predictors"])
            logits = self.lm.get_output_embeddings()(picked)
            return CausalLMOutputWithPast(loss=nn.functional.cross_entropy(logits.float(), sent["targets"]))
        out = self.lm(**inputs, labels=labels)
        if layout.rows is not None:  # logits in the packed layout would match no input row
            return CausalLMOutputWithPast(loss=out.loss)
        if embedded is not None:
            out.logits = out.logits[:, -input_ids.shape[1]:]
        return out

    def _own_masks_exact(self, layout: Layout) -> bool:
        """Whether the 4-D masks built here are the ones transformers would build: SDPA attention (other kernels take
        other mask formats), and no sliding window that could hide anything within an example."""
        from utils.fast_paths import sliding_window_covers

        config = self.lm.config
        if getattr(config, "_attn_implementation", None) != "sdpa":
            return False
        if getattr(config, "sliding_window", None) is None:
            return set(getattr(config, "layer_types", None) or ()) <= {"full_attention"}
        return sliding_window_covers(config, layout.longest)

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
        """The base model's inputs: ids and mask, or the embeddings with the soft prompt after the left padding, and
        its mask."""
        embedded = self._embed_inputs(input_ids, attention_mask, enc_input_ids, enc_attention_mask)
        if embedded is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        embeds, mask = soft_prompt_after_padding(*embedded, self.num_virtual_tokens)
        return {"inputs_embeds": embeds, "attention_mask": mask}

    def _full_attention_static_cache(self, mask: torch.Tensor, generate_kwargs: dict) -> None:
        """Where ``generate`` was asked for a static cache and the model's sliding window covers the whole sequence
        (Phi-3), pass it a full-attention one instead (``utils.fast_paths.full_attention_config``): transformers'
        own would make its compiled step compile again at every step. Where the sequence outgrows the window, keep
        transformers' cache but decode eager, for that reason. Other models keep transformers' cache."""
        from utils.fast_paths import StaticCacheSlot, cache_argument, sliding_window_covers, static_cache_length

        new = generate_kwargs.get("max_new_tokens")
        if generate_kwargs.get("cache_implementation") != "static" or not new:
            return
        length = static_cache_length(mask.shape[1] + new)
        config = self.lm.config
        if not sliding_window_covers(config, length):
            if getattr(config, "sliding_window", None) is not None:
                generate_kwargs.pop("compile_config", None)
                generate_kwargs["disable_compile"] = True
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
