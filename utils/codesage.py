"""CodeSage (v1) encoders without the hub's remote code, which no longer loads under transformers 5.

The hub checkpoints ``codesage/codesage-{small,base,large}`` ship their model class as remote code written for
transformers 4: it imports ``Conv1D`` from ``transformers.modeling_utils`` and calls ``init_weights`` in
``__init__`` and ``get_head_mask`` in ``forward``, all gone or changed in 5.x. This module builds the same
network from the checkpoint's ``config.json`` and weights: a pre-LayerNorm transformer with learned absolute
positions counted from the left edge, GPT-2-style ``Conv1D`` projections, bidirectional attention over the
unpadded tokens (padding is masked with an additive -10000), a final LayerNorm, and ``pooler_output`` = the
mean of the last hidden states over the attention mask. Dropout sits where the authors' code has it (embeddings,
attention probabilities, both residual branches; ``*_dropout_prob``, 0.1 by default) and acts only in train mode.
No remote code runs.
"""
from __future__ import annotations

import json
import types

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.pytorch_utils import Conv1D

from utils.errors import UserError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class _Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, inner = cfg.hidden_size, cfg.intermediate_size or 4 * cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.ln_1 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = Conv1D(inner, d), Conv1D(d, inner)
        self.act = ACT2FN[cfg.activation_function]
        self.attn_p = cfg.attention_dropout_prob
        self.resid_drop = nn.Dropout(cfg.residual_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.attn.c_attn(self.ln_1(x)).split(d, dim=2))
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                           dropout_p=self.attn_p if self.training else 0.0)
        x = x + self.resid_drop(self.attn.c_proj(mixed.transpose(1, 2).reshape(b, t, d)))
        return x + self.resid_drop(self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x)))))


class CodeSageEncoder(nn.Module):
    """The CodeSage encoder (frozen in this project; its dropout acts in train mode, see ``PooledEncoder``)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = types.SimpleNamespace(**{"intermediate_size": None, "layer_norm_epsilon": 1e-5,
                                               "activation_function": "gelu_new", "embedding_dropout_prob": 0.1,
                                               "attention_dropout_prob": 0.1, "residual_dropout_prob": 0.1,
                                               **config})
        cfg = self.config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.embedding_dropout_prob)
        self.h = nn.ModuleList([_Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_ignored) -> BaseModelOutputWithPooling:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions)[None])
        bias = None
        if attention_mask is not None:  # additive, as the original: a padded key gets -10000, not -inf
            bias = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0)
        for block in self.h:
            x = block(x, bias)
        x = self.ln_f(x)
        pooled = None
        if attention_mask is not None:
            mask = attention_mask[:, :, None].to(x.dtype)
            pooled = (x * mask).sum(1) / mask.sum(1)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


def read_config(source: str, token: str | None = None) -> dict:
    from transformers.utils import cached_file

    with open(cached_file(source, "config.json", token=token), encoding="utf-8") as fh:
        return json.load(fh)


def _weight_files(source: str, token: str | None) -> list[str]:
    from transformers.utils import cached_file

    for name in WEIGHT_FILES:
        path = cached_file(source, name, token=token, _raise_exceptions_for_missing_entries=False)
        if path:
            return [path]
    for name in INDEX_FILES:
        path = cached_file(source, name, token=token, _raise_exceptions_for_missing_entries=False)
        if path:
            with open(path, encoding="utf-8") as fh:
                index = json.load(fh)
            if not isinstance(index.get("weight_map"), dict):
                raise UserError(f"{path}: a shard index without a 'weight_map' object")
            shards = sorted(set(index["weight_map"].values()))
            return [cached_file(source, shard, token=token) for shard in shards]
    raise UserError(f"{source}: no weights ({' / '.join(WEIGHT_FILES + INDEX_FILES)}) beside its config.json")


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_codesage(source: str, dtype: torch.dtype = torch.float32, token: str | None = None) -> CodeSageEncoder:
    """The encoder of a CodeSage checkpoint (a hub id or a directory), its weights checked name by name."""
    model = CodeSageEncoder(read_config(source, token))
    state = {}
    for path in _weight_files(source, token):
        for name, tensor in _read_weights(path).items():
            name = name.removeprefix("transformer.")  # saved from the masked-LM class: drop its wrapper prefix
            if not name.startswith("lm_head."):
                state[name] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{source}: not a CodeSage checkpoint this loader knows ({len(missing)} missing weights, "
                        f"e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    return model.to(dtype).eval()
