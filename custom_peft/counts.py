"""Trainable-parameter counts from the registry alone (no download, no weights in memory).

PT, IDPG and LOPA use the paper's closed forms (spec §2.3, §3.1) with the registry's widths; LoRA and FFT build the
architecture on PyTorch's ``meta`` device (shapes only), which needs the model's ``arch`` values in the registry.
"""
from __future__ import annotations

import torch

from custom_peft.instance_prompts import idpg_trainable_count, lopa_trainable_count, pt_trainable_count
from utils.errors import UserError
from utils.registry import check_method, get_encoder_spec, get_model_spec


def expected_trainable_count(method: str, model_type: str, *, num_virtual_tokens: int = 10, lp_rank: int = 1,
                             enc_model_type: str | None = "codesage-small", head_dim: int | None = None,
                             lora_r: int = 16) -> int:
    """What ``count_trainable(build_model(method, model_type, …)[0])`` gives, without building the model."""
    check_method(method)
    spec = get_model_spec(model_type)
    d, m = spec.hidden_size, num_virtual_tokens
    if method == "none":
        return 0
    if method == "pt":
        return pt_trainable_count(d, m)
    if method in ("idpg", "lopa"):
        enc_dim = get_encoder_spec(enc_model_type).hidden_size
        h = head_dim or enc_dim
        if method == "idpg":
            return idpg_trainable_count(d, enc_dim, h, m)
        return lopa_trainable_count(d, enc_dim, h, m, lp_rank)
    if not spec.arch:
        raise UserError(f"model type {model_type!r} has no architecture values in utils/registry.py: count its "
                        f"{method} parameters on a built model with count_trainable")
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.models import model_config

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model_config(spec))
        if method == "fft":
            return sum(p.numel() for p in lm.parameters())
        lora = get_peft_model(lm, LoraConfig(r=lora_r, target_modules=list(spec.lora_targets),
                                             task_type=TaskType.CAUSAL_LM))
        return sum(p.numel() for p in lora.parameters() if p.requires_grad)
