"""Build any of the six methods around a foundation model, and save / load its adapter directory.

An adapter directory is peft-style: ``adapter_config.json`` (method, m, r, encoder type, base model id and width,
library version) and ``adapter_model.safetensors`` holding only the trained tensors. For ``lora`` and ``pt`` both
files are written by the real ``peft`` (so ``peft.PeftModel.from_pretrained`` reads them too) with the project's
fields added; for ``lopa`` and ``idpg`` the tensors are ``Z_S`` and the heads — the frozen encoder is referenced
by name, never copied. ``fft`` saves a whole Hugging Face model directory instead; ``none`` saves nothing.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch
from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from custom_peft.instance_prompts import IdpgPrompt, LopaPrompt
from custom_peft.tuned_model import TunedModel
from utils.errors import UserError
from utils.models import load_encoder, load_foundation_model, resolve_dtype
from utils.registry import check_method, get_model_spec

LIBRARY_NAME, LIBRARY_VERSION = "lopa-peft", "0.1.0"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


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
    return lm.get_input_embeddings().weight.shape[1]


def _wrap(method_cfg: MethodConfig, model_type: str, lm, *, dtype, enc_model_path=None, seed=0,
          model_path=None) -> TunedModel:
    spec = get_model_spec(model_type)
    d = hidden_size_of(lm)
    m, method = method_cfg.num_virtual_tokens, method_cfg.method
    meta = {"method": method, "base_model_type": model_type, "base_model_name_or_path": model_path or spec.hf_id,
            "hidden_size": d, "library": LIBRARY_NAME, "library_version": LIBRARY_VERSION}
    if spec.tiny and model_path is None:  # a tiny base is random: its seed is part of its identity
        meta["base_seed"] = seed
    if method in ("pt", "lopa", "idpg"):
        meta["num_virtual_tokens"] = m
    prompt = None
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
            backbone = get_peft_model(lm, LoraConfig(
                r=method_cfg.lora_r, lora_alpha=method_cfg.lora_alpha, lora_dropout=method_cfg.lora_dropout,
                bias="none", target_modules=list(spec.lora_targets), task_type=TaskType.CAUSAL_LM))
        elif method == "pt":
            backbone = get_peft_model(lm, PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m, prompt_tuning_init=PromptTuningInit.RANDOM))
        else:
            lm.requires_grad_(False)
            backbone = lm
            encoder, _ = load_encoder(method_cfg.enc_model_type, dtype=dtype, enc_model_path=enc_model_path,
                                      seed=seed)
            meta.update(enc_model_type=method_cfg.enc_model_type, encoder_hidden_size=encoder.hidden_size,
                        head_dim=method_cfg.head_dim or encoder.hidden_size)
            if method == "lopa":
                meta["lp_rank"] = method_cfg.lp_rank
                prompt = LopaPrompt(encoder, m, d, method_cfg.lp_rank, method_cfg.head_dim)
            else:
                prompt = IdpgPrompt(encoder, m, d, method_cfg.head_dim)
    if method == "pt":  # peft builds the prompt in the base dtype; Z_S trains in fp32
        backbone.prompt_encoder.float()
    return TunedModel(method, backbone, prompt, meta)


def build_model(method: str, model_type: str, *, num_virtual_tokens: int = 10, lp_rank: int = 1,
                enc_model_type: str | None = "codesage-small", head_dim: int | None = None, dtype="fp32",
                model_path: str | None = None, enc_model_path: str | None = None, seed: int = 9876,
                lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.1):
    """Return ``(TunedModel, tokenizer)``: the foundation model wrapped for ``method`` with fresh trainables.

    Only what the method trains has ``requires_grad``: LoRA matrices; PT's Z_S; LOPA's Z_S and heads; IDPG's
    head; every weight for ``fft``; nothing for ``none``.
    """
    cfg = MethodConfig(method, num_virtual_tokens, lp_rank, enc_model_type, head_dim, lora_r, lora_alpha,
                       lora_dropout)
    lm, tokenizer = load_foundation_model(model_type, dtype=dtype, model_path=model_path, seed=seed)
    return _wrap(cfg, model_type, lm, dtype=dtype, enc_model_path=enc_model_path, seed=seed,
                 model_path=model_path), tokenizer


def trainable_state_dict(model: TunedModel) -> dict[str, torch.Tensor]:
    """Exactly the trained tensors, under the names the adapter file uses."""
    if model.method in ("lora", "pt"):
        return get_peft_model_state_dict(model.backbone)
    if model.method in ("lopa", "idpg"):
        return {n: p for n, p in model.prompt.named_parameters() if p.requires_grad}
    raise ValueError(f"method {model.method!r} has no adapter; fft saves a full model directory")


def save_adapter(model: TunedModel, directory: str | pathlib.Path, extra: dict | None = None) -> pathlib.Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {}
    if model.method in ("lora", "pt"):
        model.backbone.save_pretrained(str(directory))
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        (directory / "README.md").unlink(missing_ok=True)
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state_dict(model).items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    config.update(model.meta)
    config.update(extra or {})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def read_adapter_config(directory: str | pathlib.Path) -> dict:
    path = pathlib.Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{directory}: no {ADAPTER_CONFIG}; pass an adapter directory written by this project")
    config = json.loads(path.read_text())
    if "method" not in config:
        raise UserError(f"{path}: field 'method' is missing (not an adapter written by {LIBRARY_NAME})")
    return config


def _mismatch(path, field, saved, given, fix) -> UserError:
    return UserError(f"{path}: field {field!r} is {saved!r} but {given!r} was asked for; {fix}")


def load_tuned_model(adapter_dir: str | pathlib.Path, model_type: str | None = None, *, method: str | None = None,
                     num_virtual_tokens: int | None = None, lp_rank: int | None = None,
                     enc_model_type: str | None = None, dtype="fp32", model_path: str | None = None,
                     enc_model_path: str | None = None, seed: int | None = None):
    """Rebuild ``(TunedModel, tokenizer)`` from an adapter directory.

    Arguments left None are taken from the directory; ones given must agree with it, and a directory that does
    not fit the base model (width, m, r, method) fails with a message naming the field.
    """
    directory = pathlib.Path(adapter_dir)
    config = read_adapter_config(directory)
    cfg_path = directory / ADAPTER_CONFIG
    checks = [("method", method, "pass the --peft_method it was trained with"),
              ("base_model_type", model_type, "pass the --model_type it was trained with"),
              ("num_virtual_tokens", num_virtual_tokens, "pass the --num_virtual_tokens it was trained with"),
              ("lp_rank", lp_rank, "pass the --lp_rank it was trained with"),
              ("enc_model_type", enc_model_type, "pass the --enc_model_type it was trained with")]
    for field, given, fix in checks:
        if given is not None and field in config and config[field] != given:
            raise _mismatch(cfg_path, field, config[field], given, fix)
    method = config["method"]
    lora = config.get("lora", {})
    cfg = MethodConfig(method, config.get("num_virtual_tokens", 10), config.get("lp_rank", 1),
                       config.get("enc_model_type"), config.get("head_dim"), lora.get("r", 16),
                       lora.get("alpha", 32), lora.get("dropout", 0.1))
    model_type = model_type or config["base_model_type"]
    seed = config.get("base_seed", 0) if seed is None else seed
    lm, tokenizer = load_foundation_model(model_type, dtype=dtype, model_path=model_path, seed=seed)
    width = hidden_size_of(lm)
    if config.get("hidden_size") not in (None, width):
        raise UserError(f"{cfg_path}: field 'hidden_size' is {config['hidden_size']} but the base model "
                        f"{model_type!r} has width {width}; pass the --model_type the adapter was trained on")
    model = _wrap(cfg, model_type, lm, dtype=dtype, enc_model_path=enc_model_path, seed=seed, model_path=model_path)
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    if method == "lora":
        result = set_peft_model_state_dict(model.backbone, tensors)
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{directory / ADAPTER_WEIGHTS}: unexpected tensors {result.unexpected_keys[:3]}")
    else:
        expected = _prompt_parameters(model)
        for name, tensor in tensors.items():
            if name not in expected:
                raise UserError(f"{directory / ADAPTER_WEIGHTS}: unexpected tensor {name!r} for method {method}")
            if expected[name].shape != tensor.shape:
                raise UserError(f"{directory / ADAPTER_WEIGHTS}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                f"the model expects {tuple(expected[name].shape)} (check 'num_virtual_tokens', "
                                f"'lp_rank' and 'hidden_size' in {ADAPTER_CONFIG})")
        missing = [n for n, p in expected.items() if p.requires_grad and n not in tensors]
        if missing:
            raise UserError(f"{directory / ADAPTER_WEIGHTS}: missing tensor {missing[0]!r}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                expected[name].copy_(tensor)
    model.eval()
    return model, tokenizer


def _prompt_parameters(model: TunedModel) -> dict[str, torch.nn.Parameter]:
    """Trainable prompt tensors under their adapter-file names (peft's name for PT's Z_S)."""
    if model.method == "pt":
        return {"prompt_embeddings": model.backbone.prompt_encoder["default"].embedding.weight}
    return dict(model.prompt.named_parameters())


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def to_dtype_name(dtype) -> str:
    torch_dtype = resolve_dtype(dtype)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[torch_dtype]
