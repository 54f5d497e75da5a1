"""Soft prompts computed from the input: LOPA's gated shared prompt and IDPG's generated prompt.

Both read a frozen encoder's pooled embedding ``x`` (B×H) of the prompt text, and train only small heads
(plus LOPA's shared prompt ``Z_S``). Shapes: m virtual tokens, d = foundation-model width, r = LOPA rank.

* LOPA: ``u = row_head(x)`` (B×m×r), ``v = col_head(x)`` (B×d×r), ``Z = Z_S ⊙ sigmoid(u vᵀ)``.
* IDPG: ``Z = head(x)`` reshaped to B×m×d; no shared prompt.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.encoders import PooledEncoder


def encoder_dropout(config) -> float:
    """The head dropout the original uses: the encoder's hidden dropout, else its dropout rate, else 0.1."""
    for name in ("hidden_dropout_prob", "dropout_rate"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 0.1


class PromptHead(nn.Module):
    """``dropout → dense(H, h) → tanh → out_proj(h, out)``; weights N(0, σ), out_proj bias zero."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float, init_std: float = 0.02):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(in_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, out_dim)
        nn.init.normal_(self.dense.weight, std=init_std)  # dense bias keeps PyTorch's default init
        nn.init.normal_(self.out_proj.weight, std=init_std)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(self.dropout(x))))


class _InstancePrompt(nn.Module):
    def __init__(self, encoder: PooledEncoder, num_virtual_tokens: int, embed_dim: int,
                 head_dim: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.num_virtual_tokens, self.embed_dim = num_virtual_tokens, embed_dim
        self.enc_dim = encoder.hidden_size
        self.head_dim = head_dim or self.enc_dim
        cfg = encoder.backbone.config
        self.dropout_p = encoder_dropout(cfg)
        self.init_std = getattr(cfg, "initializer_range", None) or 0.02
        self._compiled_heads = None

    def forward(self, enc_input_ids: torch.Tensor, enc_attention_mask: torch.Tensor,
                enc_padded: bool | None = None) -> torch.Tensor:
        """B×m×d soft prompts. ``enc_padded``: whether the encoder rows are padded, when known on the host
        (``PooledEncoder``)."""
        x = self.instance_embedding(enc_input_ids, enc_attention_mask, enc_padded)
        return (self._compiled_heads or self.prompt_from)(x)

    def prompt_from(self, x: torch.Tensor) -> torch.Tensor:
        """The soft prompts (B×m×d) from instance embeddings ``x`` (B×H): the trained part."""
        raise NotImplementedError

    def compile_heads(self, **compile_kwargs) -> None:
        """Run ``prompt_from`` compiled (``torch.compile``). Eager, LOPA's heads and gate are 28 small operations
        forward and about 55 backward per step (IDPG's: 11 and about 20), each a kernel launch the host issues."""
        self._compiled_heads = torch.compile(self.prompt_from, **compile_kwargs)

    @property
    def heads_compiled(self) -> bool:
        return self._compiled_heads is not None

    def instance_embedding(self, enc_input_ids: torch.Tensor, enc_attention_mask: torch.Tensor,
                           enc_padded: bool | None = None) -> torch.Tensor:
        if enc_input_ids is None:
            raise ValueError(f"{type(self).__name__} needs enc_input_ids / enc_attention_mask in the batch")
        # Heads train in fp32 whatever dtype the frozen encoder runs in.
        return self.encoder(enc_input_ids, enc_attention_mask, enc_padded).float()


class LopaPrompt(_InstancePrompt):
    """LOPA: ``Z = Z_S ⊙ sigmoid(u vᵀ)``; trains ``shared_prompt`` (Z_S, init N(0, 1)) and the two heads."""

    def __init__(self, encoder: PooledEncoder, num_virtual_tokens: int, embed_dim: int, rank: int = 1,
                 head_dim: int | None = None):
        super().__init__(encoder, num_virtual_tokens, embed_dim, head_dim)
        self.rank = rank
        self.shared_prompt = nn.Parameter(torch.randn(num_virtual_tokens, embed_dim))
        self.row_head = PromptHead(self.enc_dim, self.head_dim, num_virtual_tokens * rank, self.dropout_p,
                                   self.init_std)
        self.col_head = PromptHead(self.enc_dim, self.head_dim, embed_dim * rank, self.dropout_p, self.init_std)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(u vᵀ)``, B×m×d, from instance embeddings ``x`` (B×H)."""
        u = self.row_head(x).view(-1, self.num_virtual_tokens, self.rank)
        v = self.col_head(x).view(-1, self.embed_dim, self.rank)
        return torch.sigmoid(torch.bmm(u, v.transpose(1, 2)))

    def prompt_from(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_prompt.unsqueeze(0) * self.gate(x)


class IdpgPrompt(_InstancePrompt):
    """IDPG (single layer): the prompt is ``head(x)`` reshaped to B×m×d; trains the head only."""

    def __init__(self, encoder: PooledEncoder, num_virtual_tokens: int, embed_dim: int,
                 head_dim: int | None = None):
        super().__init__(encoder, num_virtual_tokens, embed_dim, head_dim)
        self.head = PromptHead(self.enc_dim, self.head_dim, num_virtual_tokens * embed_dim, self.dropout_p,
                               self.init_std)

    def prompt_from(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).view(-1, self.num_virtual_tokens, self.embed_dim)


def lopa_trainable_count(d: int, enc_dim: int, head_dim: int, m: int, r: int) -> int:
    """The paper's formula (spec §2.3): ``m·d + [H·h + h + h·m·r + m·r] + [H·h + h + h·d·r + d·r]``."""
    return m * d + (enc_dim * head_dim + head_dim + head_dim * m * r + m * r) + (
        enc_dim * head_dim + head_dim + head_dim * d * r + d * r)


def idpg_trainable_count(d: int, enc_dim: int, head_dim: int, m: int) -> int:
    """``H·h + h + h·m·d + m·d`` (spec §3.1; the original's unused PT embedding is not counted or built)."""
    return enc_dim * head_dim + head_dim + head_dim * m * d + m * d


def pt_trainable_count(d: int, m: int) -> int:
    return m * d
