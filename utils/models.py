"""Load foundation models and their tokenizers: from the hub, a local path, or tiny configs (encoders:
``utils/encoders.py``).

Hub access reads a token only from the environment (``HF_TOKEN``) and never logs in. In offline mode a model
missing from the local cache fails at once with a message naming the model and the way out.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase,
                          PreTrainedTokenizerFast)
from tokenizers import Tokenizer, processors

from utils.codegen2 import adopt_native_layout
from utils.errors import UserError
from utils.train_logging import LOGGER_NAME
from utils.registry import FoundationModelSpec, get_model_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_TOKENIZER_FILE = pathlib.Path(__file__).parent / "assets" / "code_bpe_2048.json"
TINY_MODEL_TYPES = ("tiny-phi-2", "tiny-phi-3", "tiny-llama", "tiny-codegen")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextlib.contextmanager
def seeded(seed: int):
    """Draw random init from ``seed`` without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def hub_error(what: str, hf_id: str, flag: str, exc: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = ("HF_HUB_OFFLINE=1 and it is not in the local cache" if offline and not os.path.isdir(hf_id)
           else f"it could not be loaded ({exc})")
    return UserError(
        f"{what} {hf_id!r} is unavailable: {why}. Pass {flag} DIR with a local copy, or use a tiny model type "
        f"({', '.join(TINY_MODEL_TYPES)} / tiny-roberta, minilm) that needs no download."
    )


def finish_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """EOS falls back to BOS and PAD to EOS (as the original does); our collators pad explicitly."""
    if tok.eos_token is None and tok.bos_token is not None:
        tok.eos_token = tok.bos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------- tokenizers
def tiny_tokenizer(kind: str = "gpt", adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """The project's small byte-level BPE (trained on Python sources, shipped in utils/assets).

    kind ``gpt``: ``<|endoftext|>`` is BOS, EOS and PAD (phi-2/CodeGen style); with ``adds_bos`` the BOS is
    ``<s>``, EOS ``</s>``, PAD ``<pad>`` and every encoding starts with ``<s>`` (Llama/DeepSeek style).
    kind ``roberta``: ``<s> … </s>`` around every encoding, PAD ``<pad>`` (an encoder tokenizer).
    """
    backend = Tokenizer.from_file(str(TINY_TOKENIZER_FILE))
    vocab = backend.get_vocab()
    if kind == "roberta":
        backend.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                       cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                                       unk_token="<|endoftext|>", model_max_length=512)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<|endoftext|>", model_max_length=1024)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=1024)
    return finish_tokenizer(tok)


def _has_tokenizer_files(path: str | os.PathLike) -> bool:
    p = pathlib.Path(path)
    return (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists()


def _bos_as_registered(tok: PreTrainedTokenizerBase, spec: FoundationModelSpec, source: str):
    """Make ``tok`` prepend a BOS exactly when the registry says the original's runs had one (spec §4.1).

    transformers 5 takes that from tokenizer.json's post-processor and ignores tokenizer_config.json's
    ``add_bos_token``, from which transformers 4 rebuilt it; so the same hub files can give another answer here.
    """
    probe = tok("x")["input_ids"]
    adds = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    appends_eos = tok.eos_token_id is not None and len(probe) > 1 and probe[-1] == tok.eos_token_id
    if adds == spec.adds_bos:
        return tok
    if not isinstance(tok, PreTrainedTokenizerFast) or (spec.adds_bos and tok.bos_token is None):
        raise UserError(f"{source}: this tokenizer {'does not prepend' if spec.adds_bos else 'prepends'} a BOS token, "
                        f"unlike {spec.name}'s in the original runs, and cannot be changed here; pass the model's "
                        f"own tokenizer files")
    logging.getLogger(LOGGER_NAME).warning(
        "%s: the tokenizer files %s a BOS token; %s's tokenizer %s one in the original runs, and this run follows "
        "them: it %s one", source, "do not prepend" if spec.adds_bos else "prepend", spec.name,
        "prepended" if spec.adds_bos else "did not prepend", "prepends" if spec.adds_bos else "prepends no")
    tok.add_eos_token = appends_eos  # the rebuilt post-processor keeps an EOS that the files append
    tok.add_bos_token = spec.adds_bos  # rebuilds the post-processor
    return tok


TOKENIZER_PROBE = "\n\ndef f(x, y=12):\n    \"\"\"Return x.\"\"\"\n\treturn  x[0] + 'héllo'  # ok\n"


def _warn_unless_as_tokenizer_json(tok: PreTrainedTokenizerBase, source: str, token: str | None) -> None:
    """Warn when ``tok`` splits text otherwise than the checkpoint's own tokenizer.json.

    transformers 5 may rebuild a tokenizer's pipeline from its class instead of reading it from tokenizer.json
    (5.17 does so for DeepSeek-Coder's files: a Llama class over a byte-level BPE, and gets other ids); transformers
    4, which the original ran, used tokenizer.json as it is.
    """
    from transformers.utils import cached_file

    path = cached_file(source, "tokenizer.json", token=token, _raise_exceptions_for_missing_entries=False)
    if not path:
        return
    want = Tokenizer.from_file(path).encode(TOKENIZER_PROBE, add_special_tokens=False).ids
    got = tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if got != want:
        import transformers

        logging.getLogger(LOGGER_NAME).warning(
            "%s: transformers %s tokenizes otherwise than this checkpoint's tokenizer.json (%d vs %d tokens for a "
            "probe text), so prompts differ from the original's; requirements.txt pins the version that matches",
            source, transformers.__version__, len(got), len(want))


def load_tokenizer(model_type: str, model_path: str | None = None) -> PreTrainedTokenizerBase:
    spec = get_model_spec(model_type)
    if model_path is not None and _has_tokenizer_files(model_path):
        source, token = model_path, None
    elif spec.tiny:
        return tiny_tokenizer("gpt", adds_bos=spec.adds_bos)
    else:
        source, token = spec.hf_id, os.environ.get("HF_TOKEN")
    try:
        tok = AutoTokenizer.from_pretrained(source, token=token)
    except (OSError, ValueError) as exc:
        if source == model_path:
            raise UserError(f"{model_path}: its tokenizer files do not load ({type(exc).__name__}: {exc}); pass a "
                            f"directory written by save_pretrained") from exc
        raise hub_error("tokenizer of model", spec.hf_id, "--model_path", exc) from exc
    _warn_unless_as_tokenizer_json(tok, source, token)
    return finish_tokenizer(_bos_as_registered(tok, spec, source))


# ------------------------------------------------------------------------------------------ causal LMs
def model_config(spec: FoundationModelSpec, tokenizer: PreTrainedTokenizerBase | None = None):
    """A transformers config for ``spec.arch`` (tiny models and the benchmark architectures)."""
    if not spec.arch:
        raise UserError(f"model type {spec.name!r} has no architecture values in utils/registry.py")
    values = dict(spec.arch)
    if tokenizer is not None:
        values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_causal_lm(spec: FoundationModelSpec, *, dtype=torch.float32, seed: int = 0, tokenizer=None):
    """A random-init model of ``spec``'s architecture (deterministic for a seed)."""
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer), dtype=resolve_dtype(dtype))
    return model


def check_local_model_fits(model_path: str, spec) -> None:
    """A local model directory must be of ``spec``'s architecture: another one would be tuned and reported under
    the wrong name, with the wrong BOS rule and LoRA targets. Another width (a smaller variant of the family) is a
    warning."""
    try:
        config = json.loads((pathlib.Path(model_path) / "config.json").read_text(encoding="utf-8"))
        found = config.get("model_type")
        width = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(config.get(k), int)),
                     None)
    except (OSError, ValueError, AttributeError):
        return  # no readable config: from_pretrained says what is wrong
    if found is not None and spec.family is not None and found != spec.family:
        raise UserError(f"{model_path}: a {found!r} model (config.json), but --model_type {spec.name} is a "
                        f"{spec.family!r} one; pass the --model_type of this model, or the model of this type")
    if not spec.tiny and width is not None and width != spec.hidden_size:  # a smaller variant may be meant
        logging.getLogger(LOGGER_NAME).warning(
            "%s: width %d (config.json), but %s has width %d: not the model of that name (results and records "
            "will carry its name)", model_path, width, spec.name, spec.hidden_size)


def _allocate_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every floating-point parameter left on the meta device CPU memory of ``dtype``, uninitialised (tied
    ones stay one tensor)."""
    made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (meta parameter, kept alive; its new tensor)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    kind = dtype if param.is_floating_point() else param.dtype
                    made[id(param)] = (param, nn.Parameter(torch.empty_like(param, device="cpu", dtype=kind),
                                                           requires_grad=param.requires_grad))
                module._parameters[name] = made[id(param)][1]


def _hub_token(source: str) -> str | None:
    """``HF_TOKEN`` for a hub id, none for a local directory."""
    return None if os.path.isdir(source) else os.environ.get("HF_TOKEN")


def _empty_causal_lm(spec: FoundationModelSpec, source: str | None, generation_sources: list[str], dtype,
                     tokenizer):
    """The architecture of ``source``'s config.json (the registry's values for a tiny type when None), its weights
    allocated and not initialised, its buffers (rotary frequencies) computed as usual; its generation config is the
    first of ``generation_sources`` that has one, as ``from_pretrained`` reads it."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    try:
        config = (model_config(spec, tokenizer) if source is None
                  else AutoConfig.from_pretrained(source, token=_hub_token(source)))
    except (OSError, ValueError) as exc:
        if os.path.isdir(source):
            raise UserError(f"{source}: its config.json does not load ({type(exc).__name__}: {exc})") from exc
        raise hub_error("config of model", spec.hf_id, "--model_path", exc) from exc
    # built in fp32, as from_pretrained builds its buffers: under a bf16 default dtype CodeGen's rotary table came
    # out rounded (0.1 off within MBPP's 581 positions, and other greedy completions); only the weights take dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _allocate_parameters(model, dtype)
    model.config.dtype = dtype
    model.tie_weights()  # not done on the meta device: a tied lm_head would be a tensor of its own, never loaded
    for where in generation_sources:
        try:
            model.generation_config = GenerationConfig.from_pretrained(where, token=_hub_token(where))
            break
        except OSError:  # none there: from_config's, made from the model config, as from_pretrained falls back to
            continue
    return model


def load_foundation_model(model_type: str, *, dtype: str | torch.dtype = "fp32", model_path: str | None = None,
                          seed: int = 0, random_weights: bool = False, empty_weights: bool = False,
                          config_dir: str | None = None):
    """Return ``(model, tokenizer)`` for a registry model type.

    ``model_path``: a local Hugging Face model directory (a downloaded copy, or an FFT output) used instead of
    the hub id; for tiny types it loads saved weights instead of building random ones.
    ``random_weights``: build the real architecture from the registry's config values with random weights and the
    project's small tokenizer (benchmarks: speed does not depend on weight values; nothing is downloaded).
    ``empty_weights``: the architecture alone, its weights allocated but neither downloaded, read nor initialised,
    for a checkpoint that supplies every one next (``utils.generation.load_fft_weights`` refuses one that does
    not). Its config.json is ``config_dir``'s when given (a checkpoint directory with a copy of it), else
    ``model_path``'s or the hub's (the registry's values for tiny types).
    """
    spec = get_model_spec(model_type)
    torch_dtype = resolve_dtype(dtype)
    if random_weights:
        tokenizer = tiny_tokenizer("gpt", adds_bos=spec.adds_bos)
        model = random_causal_lm(spec, dtype=torch_dtype, seed=seed)
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    if model_path is not None:
        if not pathlib.Path(model_path).is_dir():
            raise UserError(f"--model_path {model_path}: not a directory")
        check_local_model_fits(model_path, spec)
    if config_dir is not None:
        check_local_model_fits(config_dir, spec)
    tokenizer = load_tokenizer(model_type, model_path)
    if empty_weights:
        base = model_path or (None if spec.tiny else spec.hf_id)
        model = _empty_causal_lm(spec, config_dir or base, [d for d in (config_dir, base) if d is not None],
                                 torch_dtype, tokenizer)
    elif model_path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        except (OSError, ValueError, KeyError) as exc:  # KeyError: a shard index without its "metadata"
            raise UserError(f"{model_path}: not a loadable Hugging Face model directory ({exc}); pass a directory "
                            f"written by save_pretrained") from exc
    elif spec.tiny:
        model = random_causal_lm(spec, dtype=torch_dtype, seed=seed, tokenizer=tokenizer)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.hf_id, dtype=torch_dtype, token=os.environ.get("HF_TOKEN"))
        except (OSError, ValueError) as exc:
            raise hub_error("model", spec.hf_id, "--model_path", exc) from exc
    if spec.fused_qkv_shards:
        adopt_native_layout(model, spec.fused_qkv_shards, model_path or spec.hf_id)
    if getattr(model.config, "pad_token_id", None) is None:  # CodeGen's config class has no such field in 5.x
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def context_length(config) -> int | None:
    """The most positions ``config``'s model was built for (None when the config names no limit)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits_context(tokens: int, config, what: str, remedy: str) -> None:
    """Refuse sequences longer than the model's context: rotary models would run on, at positions they were never
    trained on, and give garbage without an error."""
    limit = context_length(config)
    if limit is not None and tokens > limit:
        raise UserError(f"{what}: {tokens} tokens, more than the model's context of {limit}; {remedy}")


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 has partitioned it away (its local shard is empty)."""
    return getattr(p, "ds_numel", p.numel())


def full_shape(p: torch.Tensor) -> torch.Size:
    """Shape of a parameter, also when DeepSpeed ZeRO-3 has partitioned it away (its local shard is 1-D, empty)."""
    return getattr(p, "ds_shape", p.shape)


def enable_activation_checkpointing(lm) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant checkpoints).

    transformers 5.24 renamed ``gradient_checkpointing_enable`` (deprecated, removed in v6) to
    ``activation_checkpointing_enable``; older 5.x releases have only the first.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
