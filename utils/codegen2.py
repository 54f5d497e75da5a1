"""CodeGen2 checkpoints (``Salesforce/codegen2-*``) on transformers' own CodeGen class, without the hub's remote code.

The hub ships CodeGen2's model class as remote code written for transformers 4: its ``forward`` calls
``get_head_mask`` (gone in 5.x, so every forward fails), and its ``prepare_inputs_for_generation`` reads the old
``past`` argument, so under a newer ``generate`` it would drop both the KV cache and ``inputs_embeds``. Its network
is transformers' CodeGen in every respect but one: the rows of the fused ``qkv_proj`` are interleaved across 8
model-parallel shards (the remote code's ``mp_num = 8``), where transformers' CodeGen reads them across 4.

``adopt_native_layout`` reorders those rows once, after loading, so that the model is a plain transformers CodeGen
from then on (LoRA on ``qkv_proj``, full fine-tuning, KV caches, compile). The config then records the layout
(``fused_qkv_shards = 4``) and drops ``auto_map``, so a saved copy (an FFT ``final/``) loads back natively and is not
reordered twice. What this does not reproduce: the remote code computes attention scores in fp32 whatever the
model's dtype; transformers' CodeGen computes them in the model's dtype (bf16 differs in the last bits).
"""
from __future__ import annotations

import contextlib

import torch

from utils.errors import UserError

NATIVE_SHARDS = 4
"""The shard count transformers' CodeGen attention reads its fused qkv rows with."""
LAYOUT_KEY = "fused_qkv_shards"


def qkv_row_order(embed_dim: int, from_shards: int, to_shards: int = NATIVE_SHARDS) -> torch.Tensor:
    """Row indices that turn a fused qkv weight laid out over ``from_shards`` into the layout over ``to_shards``.

    With S shards the 3E rows form S blocks; block s holds, in this order, rows s of the query, value and key
    projections, each E / S long. ``new_weight = weight[order]``.
    """
    for shards in (from_shards, to_shards):
        if embed_dim % shards:
            raise ValueError(f"embedding width {embed_dim} does not split into {shards} shards")
    rows = torch.arange(3 * embed_dim).view(from_shards, 3, embed_dim // from_shards)
    by_projection = rows.transpose(0, 1).reshape(3, embed_dim)  # query, value, key rows in natural order
    return by_projection.view(3, to_shards, embed_dim // to_shards).transpose(0, 1).reshape(-1)


@torch.no_grad()
def adopt_native_layout(model, checkpoint_shards: int, source: str) -> None:
    """Reorder every ``qkv_proj`` of a CodeGen ``model`` from its checkpoint's layout to transformers' layout.

    The checkpoint's layout is the config's ``fused_qkv_shards`` when it has one (a copy this project saved),
    ``checkpoint_shards`` (the registry's value for the hub weights) otherwise. ``source`` names the checkpoint in
    errors.
    """
    config = model.config
    if config.model_type != "codegen":
        raise UserError(f"{source}: a {config.model_type!r} model, not CodeGen; pass the CodeGen2 checkpoint or "
                        f"the --model_type that matches this one")
    shards = getattr(config, LAYOUT_KEY, checkpoint_shards)
    if config.num_attention_heads % shards:
        raise UserError(f"{source}: config.json {LAYOUT_KEY}={shards} does not divide its {config.num_attention_heads} "
                        f"attention heads; the file is not a CodeGen2 checkpoint or this project's copy of one")
    if shards != NATIVE_SHARDS:
        order = qkv_row_order(config.n_embd, shards)
        projections = [m.qkv_proj for m in model.modules() if hasattr(m, "qkv_proj")]
        with _gathered([proj.weight for proj in projections]):
            for proj in projections:
                proj.weight.copy_(proj.weight[order.to(proj.weight.device)])
    setattr(config, LAYOUT_KEY, NATIVE_SHARDS)
    if "auto_map" in vars(config):  # the hub's remote code reads the old layout: never route a copy to it
        del config.auto_map


def _gathered(params):
    """ZeRO-3 leaves each process an empty shard of every parameter: gather them whole to edit (rank 0's edit is
    kept; every rank makes the same one), a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
