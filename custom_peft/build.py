"""Build any of the six methods around a foundation model, with exactly the method's tensors trainable.

``build_model`` makes a fresh model for training; ``custom_peft.adapters`` saves what it trained and rebuilds it
(through ``_wrap``, so a loaded model is built the same way as a trained one).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from custom_peft.instance_prompts import IdpgPrompt, LopaPrompt
from custom_peft.tuned_model import TunedModel
from utils.encoders import load_encoder
from utils.errors import UserError
from utils.models import full_shape, load_foundation_model, numel
from utils.registry import check_method, get_encoder_spec, get_model_spec

LIBRARY_NAME, LIBRARY_VERSION = "lopa-peft", "0.1.0"


@dataclass
class MethodConfig:
    """Hyper-parameters of a method; the defaults are the paper's (spec §10.5)."""

    method: str
    num_virtual_tokens: int = 10
    lp_rank: int = 1
    enc_model_type: str | None = "codesage-small"
    head_dim: int | None = None
    """MLP width h of the LOPA/IDPG heads; None means the encoder width H, as in the paper."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1

    def __post_init__(self):
        check_method(self.method)
        if self.method in ("pt", "lopa", "idpg") and self.num_virtual_tokens < 1:
            raise UserError(f"--num_virtual_tokens must be >= 1 for {self.method}, got {self.num_virtual_tokens}")
        if self.method == "lopa" and self.lp_rank < 1:
            raise UserError(f"--lp_rank must be >= 1, got {self.lp_rank}")
        if self.method in ("lopa", "idpg") and not self.enc_model_type:
            raise UserError(f"{self.method} needs --enc_model_type")


def hidden_size_of(lm) -> int:
    return full_shape(lm.get_input_embeddings().weight)[1]


def _wrap(method_cfg: MethodConfig, model_type: str, lm, *, dtype, enc_model_path=None, seed=0,
          model_path=None, random_weights: bool = False) -> TunedModel:
    spec = get_model_spec(model_type)
    d = hidden_size_of(lm)
    m, method = method_cfg.num_virtual_tokens, method_cfg.method
    # a local path is recorded absolute: loading the adapter from another working directory must find it too
    meta = {"method": method, "base_model_type": model_type,
            "base_model_name_or_path": os.path.abspath(model_path) if model_path else spec.hf_id,
            "hidden_size": d, "library": LIBRARY_NAME, "library_version": LIBRARY_VERSION}
    if spec.tiny and model_path is None:  # a tiny base is random: its seed is part of its identity
        meta["base_seed"] = seed
    if method in ("pt", "lopa", "idpg"):
        meta["num_virtual_tokens"] = m
    prompt = enc_tokenizer = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "fft":
            lm.requires_grad_(True)
            backbone = lm
        elif method == "none":
            lm.requires_grad_(False)
            backbone = lm
        elif method == "lora":
            meta["lora"] = {"r": method_cfg.lora_r, "alpha": method_cfg.lora_alpha,
                            "dropout": method_cfg.lora_dropout, "target_modules": list(spec.lora_targets)}
            with _peft_deprecation_quiet():
                backbone = get_peft_model(lm, LoraConfig(
                    r=method_cfg.lora_r, lora_alpha=method_cfg.lora_alpha, lora_dropout=method_cfg.lora_dropout,
                    bias="none", target_modules=list(spec.lora_targets), task_type=TaskType.CAUSAL_LM))
        elif method == "pt":
            with _peft_deprecation_quiet():
                backbone = get_peft_model(lm, PromptTuningConfig(
                    task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m, prompt_tuning_init=PromptTuningInit.RANDOM))
        else:
            lm.requires_grad_(False)
            backbone = lm
            encoder, enc_tokenizer = load_encoder(method_cfg.enc_model_type, dtype=dtype, enc_model_path=enc_model_path,
                                      seed=seed, random_weights=random_weights)
            meta.update(enc_model_type=method_cfg.enc_model_type, encoder_hidden_size=encoder.hidden_size,
                        head_dim=method_cfg.head_dim or encoder.hidden_size)
            if get_encoder_spec(method_cfg.enc_model_type).tiny and enc_model_path is None:
                meta["encoder_seed"] = seed  # a tiny encoder is random too
            if enc_model_path is not None:  # loading reads it again: the registry's encoder could be another one
                meta["enc_model_name_or_path"] = os.path.abspath(enc_model_path)
            if method == "lopa":
                meta["lp_rank"] = method_cfg.lp_rank
                prompt = LopaPrompt(encoder, m, d, method_cfg.lp_rank, method_cfg.head_dim)
            else:
                prompt = IdpgPrompt(encoder, m, d, method_cfg.head_dim)
    if method == "pt":  # peft builds the prompt in the base dtype; Z_S trains in fp32
        backbone.prompt_encoder.float()
    return TunedModel(method, backbone, prompt, meta, enc_tokenizer)


@contextlib.contextmanager
def _peft_deprecation_quiet():
    """peft 0.21's ``get_peft_model`` reads a property transformers 5.24 deprecated (a FutureWarning on every LoRA
    and PT build, in every log); not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def build_model(method: str, model_type: str, *, num_virtual_tokens: int = 10, lp_rank: int = 1,
                enc_model_type: str | None = "codesage-small", head_dim: int | None = None, dtype="fp32",
                model_path: str | None = None, enc_model_path: str | None = None, seed: int = 9876,
                lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.1, random_weights: bool = False,
                empty_weights: bool = False, config_dir: str | None = None):
    """Return ``(TunedModel, tokenizer)``: the foundation model wrapped for ``method`` with fresh trainables.

    ``random_weights``: the real architecture with random weights and no download (benchmarks only).
    ``empty_weights``, ``config_dir``: the base's weights are not read, for a checkpoint that supplies them all
    (``utils.models.load_foundation_model``).

    Only what the method trains has ``requires_grad``: LoRA matrices; PT's Z_S; LOPA's Z_S and heads; IDPG's
    head; every weight for ``fft``; nothing for ``none``.
    """
    cfg = MethodConfig(method, num_virtual_tokens, lp_rank, enc_model_type, head_dim, lora_r, lora_alpha,
                       lora_dropout)
    lm, tokenizer = load_foundation_model(model_type, dtype=dtype, model_path=model_path, seed=seed,
                                          random_weights=random_weights, empty_weights=empty_weights,
                                          config_dir=config_dir)
    return _wrap(cfg, model_type, lm, dtype=dtype, enc_model_path=enc_model_path, seed=seed,
                 model_path=model_path, random_weights=random_weights), tokenizer


def count_trainable(model: torch.nn.Module) -> int:
    return sum(numel(p) for p in model.parameters() if p.requires_grad)
