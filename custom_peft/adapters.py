"""Save and load what a method trained, in peft's adapter-directory format.

An adapter directory holds ``adapter_config.json`` (method, m, r, encoder type, base model id and width, library
version) and ``adapter_model.safetensors`` with only the trained tensors:

* ``lora`` / ``pt``: both files are written by the real ``peft`` (so ``peft.PeftModel.from_pretrained`` reads
  them too; it warns that it ignores the project's extra config fields) with the project's fields added.
* ``lopa``: ``shared_prompt`` (Z_S) and the ``row_head.*`` / ``col_head.*`` tensors; ``idpg``: ``head.*``.
  The frozen encoder is referenced by name (``enc_model_type``), never copied.
* ``fft``: a whole Hugging Face model directory plus ``tuning_config.json`` with the same fields (an
  ``adapter_config.json`` there would make ``from_pretrained`` treat the model as a peft adapter).
* ``none``: nothing to save.
"""
from __future__ import annotations

import json
import pathlib

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from custom_peft.build import LIBRARY_NAME, MethodConfig, _wrap, hidden_size_of
from custom_peft.tuned_model import TunedModel
from utils.data import read_text_file
from utils.errors import UserError
from utils.fileio import open_file_modes
from utils.models import load_foundation_model
from utils.registry import get_model_spec

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FFT_CONFIG = "tuning_config.json"


def trainable_state_dict(model: TunedModel) -> dict[str, torch.Tensor]:
    """Exactly the trained tensors, under the names the adapter file uses (fft: the whole model's)."""
    if model.method in ("lora", "pt"):
        return get_peft_model_state_dict(model.backbone)
    if model.method in ("lopa", "idpg"):
        return {n: p for n, p in model.prompt.named_parameters() if p.requires_grad}
    if model.method == "fft":
        return model.lm.state_dict()
    raise ValueError(f"method {model.method!r} trains nothing")


def save_adapter(model: TunedModel, directory: str | pathlib.Path, extra: dict | None = None) -> pathlib.Path:
    """Write the method's directory (see the module docstring); ``extra`` fields go into its config."""
    if model.method == "none":
        raise ValueError("method 'none' trains nothing: there is no adapter to save")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config, config_name = {}, ADAPTER_CONFIG
    if model.method in ("lora", "pt"):
        model.backbone.save_pretrained(str(directory))
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        (directory / "README.md").unlink(missing_ok=True)
    elif model.method == "fft":
        model.lm.save_pretrained(str(directory))
        config_name = FFT_CONFIG
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state_dict(model).items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    config.update(model.meta)
    config.update(extra or {})
    (directory / config_name).write_text(json.dumps(config, indent=2, sort_keys=True))
    open_file_modes(directory)
    return directory


def read_adapter_config(directory: str | pathlib.Path) -> dict:
    """The directory's config (``adapter_config.json``, or ``tuning_config.json`` of an fft directory)."""
    directory = pathlib.Path(directory)
    path = next((directory / n for n in (ADAPTER_CONFIG, FFT_CONFIG) if (directory / n).is_file()), None)
    if path is None:
        raise UserError(_no_adapter_config(directory))
    try:
        config = json.loads(read_text_file(path, "re-save the adapter"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-save the adapter") from exc
    if "method" not in config:
        raise UserError(f"{path}: field 'method' is missing (not an adapter written by {LIBRARY_NAME}); "
                        f"re-save it with {LIBRARY_NAME}, or load a plain peft adapter with peft itself")
    return config


def _no_adapter_config(directory: pathlib.Path) -> str:
    """Why ``directory`` is not an adapter directory, and the one that was probably meant."""
    if not directory.is_dir():
        return f"{directory}: no such directory; pass the adapter directory training wrote (<log_dir>/final)"
    if (directory / "final" / ADAPTER_CONFIG).is_file():
        return f"{directory}: no {ADAPTER_CONFIG}; this is a training log_dir: pass {directory / 'final'}"
    if (directory / "adapter" / ADAPTER_CONFIG).is_file():
        return f"{directory}: no {ADAPTER_CONFIG}; this is a training checkpoint: pass {directory / 'adapter'}"
    from utils.checkpoint import training_log_dir_hint

    if (hint := training_log_dir_hint(directory)) is not None:  # its config.json is the run's, not a model's
        return f"{directory}: no {ADAPTER_CONFIG}; this is {hint}"
    if (directory / "config.json").is_file():
        return (f"{directory}: no {ADAPTER_CONFIG}; this is a whole model directory (full fine-tuning): pass it as "
                f"--load_base_from_path instead")
    return (f"{directory}: no {ADAPTER_CONFIG}; pass an adapter directory written by this project (<log_dir>/final "
            f"of tune_foundation_model.py)")


def _check_fit(config: dict, path: pathlib.Path, *, method, model_type, model_path, num_virtual_tokens, lp_rank,
               enc_model_type) -> None:
    """Raise a UserError naming the first field of ``config`` that contradicts what the caller asked for."""
    def mismatch(field, given, fix):
        return UserError(f"{path}: field {field!r} is {config[field]!r} but {given!r} was asked for; {fix}")

    if method is not None and config["method"] != method:
        raise mismatch("method", method, "pass the --peft_method it was trained with")
    recorded = config.get("base_model_name_or_path")
    from_hub = model_type is not None and recorded in (None, get_model_spec(model_type).hf_id)
    if from_hub and model_path is None and config.get("hidden_size") is not None:
        # the registry knows the hub model's width: fail before any download (a recorded local base is checked
        # once it is loaded)
        width = get_model_spec(model_type).hidden_size
        if width != config["hidden_size"]:
            raise UserError(f"{path}: field 'hidden_size' is {config['hidden_size']} but --model_type {model_type} "
                            f"has width {width}; pass the --model_type the adapter was trained on "
                            f"({config.get('base_model_type')})")
    for field, given, flag in (("base_model_type", model_type, "--model_type"),
                               ("num_virtual_tokens", num_virtual_tokens, "--num_virtual_tokens"),
                               ("lp_rank", lp_rank, "--lp_rank"),
                               ("enc_model_type", enc_model_type, "--enc_model_type")):
        if given is not None and field in config and config[field] != given:
            raise mismatch(field, given, f"pass the {flag} it was trained with")
        if given is not None and field not in config and field != "base_model_type":  # e.g. an encoder for pt
            raise UserError(f"{path}: a {config['method']} adapter has no field {field!r}, but {flag} {given} was "
                            f"given; drop {flag} (a {config['method']} adapter does not use it)")


def load_tuned_model(adapter_dir: str | pathlib.Path, model_type: str | None = None, *, method: str | None = None,
                     num_virtual_tokens: int | None = None, lp_rank: int | None = None,
                     enc_model_type: str | None = None, dtype="fp32", model_path: str | None = None,
                     enc_model_path: str | None = None, seed: int | None = None):
    """Rebuild ``(TunedModel, tokenizer)`` in eval mode from a directory :func:`save_adapter` wrote.

    Arguments left None are taken from the directory; ones given must agree with it, and a directory that does
    not fit the base model (width, m, r, method, encoder) fails with a UserError naming the field. For an fft
    directory the directory itself is the model (``model_path`` is not used).
    """
    directory = pathlib.Path(adapter_dir)
    config = read_adapter_config(directory)
    cfg_path = directory / (ADAPTER_CONFIG if (directory / ADAPTER_CONFIG).is_file() else FFT_CONFIG)
    _check_fit(config, cfg_path, method=method, model_type=model_type, model_path=model_path,
               num_virtual_tokens=num_virtual_tokens, lp_rank=lp_rank, enc_model_type=enc_model_type)
    method = config["method"]
    if method == "fft":
        model_path = str(directory)
    elif model_path is None:  # the base training ran on, when that was a local directory
        model_path = _recorded_base(config, cfg_path, model_type or config["base_model_type"])
    if enc_model_path is None and config.get("enc_model_name_or_path"):  # likewise a local encoder
        enc_model_path = _recorded_directory(config, cfg_path, "enc_model_name_or_path", "--enc_model_path")
    lora = config.get("lora", {})
    cfg = MethodConfig(method, config.get("num_virtual_tokens", 10), config.get("lp_rank", 1),
                       config.get("enc_model_type"), config.get("head_dim"), lora.get("r", 16),
                       lora.get("alpha", 32), lora.get("dropout", 0.1))
    model_type = model_type or config["base_model_type"]
    if seed is None:  # tiny (random) bases and encoders are rebuilt from the seed they were built with
        seed = config.get("base_seed", config.get("encoder_seed", 0))
    lm, tokenizer = load_foundation_model(model_type, dtype=dtype, model_path=model_path, seed=seed)
    width = hidden_size_of(lm)
    if config.get("hidden_size") not in (None, width):
        raise UserError(f"{cfg_path}: field 'hidden_size' is {config['hidden_size']} but the base model "
                        f"{model_type!r} has width {width}; pass the --model_type the adapter was trained on")
    model = _wrap(cfg, model_type, lm, dtype=dtype, enc_model_path=enc_model_path, seed=seed, model_path=model_path)
    if model.prompt is not None and config.get("encoder_hidden_size") not in (None, model.prompt.enc_dim):
        raise UserError(f"{cfg_path}: field 'encoder_hidden_size' is {config['encoder_hidden_size']} but the encoder "
                        f"loaded for {config.get('enc_model_type')!r} has width {model.prompt.enc_dim}; pass the "
                        f"--enc_model_path (or none) the adapter was trained with")
    if method != "fft":
        _load_trained_tensors(model, directory / ADAPTER_WEIGHTS)
    model.eval()
    return model, tokenizer


def _recorded_base(config: dict, cfg_path: pathlib.Path, model_type: str) -> str | None:
    """``base_model_name_or_path`` when it is not the registry's hub id (training had --model_path): the hub model
    (or, for a tiny type, a random one) would be another base, and the adapter's numbers would silently mean
    nothing."""
    recorded = config.get("base_model_name_or_path")
    if recorded is None or recorded == get_model_spec(model_type).hf_id:
        return None
    return _recorded_directory(config, cfg_path, "base_model_name_or_path", "--model_path")


def _recorded_directory(config: dict, cfg_path: pathlib.Path, field: str, flag: str) -> str:
    recorded = config[field]
    if not (pathlib.Path(recorded) / "config.json").is_file():
        raise UserError(f"{cfg_path}: field {field!r} is {recorded!r}, the local model the adapter was trained on, "
                        f"and it is not there; pass {flag} with that model (or a copy of it)")
    return recorded


def _load_trained_tensors(model: TunedModel, path: pathlib.Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: missing; an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:  # a cut copy or another file under this name: the header does not parse
        raise UserError(f"{path}: not a readable safetensors file ({exc}); it is damaged or cut short: re-save the "
                        f"adapter (or copy it again)") from None
    expected = {n: t.shape for n, t in trainable_state_dict(model).items()}
    for name, tensor in tensors.items():
        if name not in expected:
            raise UserError(f"{path}: unexpected tensor {name!r} for method {model.method} (the file holds only "
                            f"trained tensors; check 'method' in {ADAPTER_CONFIG})")
        if expected[name] != tensor.shape:
            raise UserError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(expected[name])}; check 'num_virtual_tokens', 'lp_rank', 'hidden_size' and "
                            f"'head_dim' in {ADAPTER_CONFIG}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} in all); re-save the adapter")
    if model.method == "lora":
        set_peft_model_state_dict(model.backbone, tensors)
        return
    params = ({"prompt_embeddings": model.backbone.prompt_encoder["default"].embedding.weight}
              if model.method == "pt" else dict(model.prompt.named_parameters()))
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
