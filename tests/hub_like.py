"""Tiny local copies of the real hub checkpoints' files: the hub's config keys and values (sizes shrunk), its
generation_config.json, and a tokenizer with the real special-token strings, BOS/EOS/PAD presence and tokenizer_config
fields. Vocabulary ids differ from the real ones (the project's small BPE); config ids match this tokenizer.

Seen in public copies of the hub files (huggingface.co pages in the search index; "copy" = another repo re-uploading
the file): Phi-3-mini-4k's config.json (pad 32000, sliding_window 2047, rope_scaling null, torch_dtype bfloat16,
auto_map) and generation EOS list [32000, 32001, 32007]; its tokenizer_config.json add_bos_token/add_eos_token false
(quoted from microsoft/Phi-3-mini-4k-instruct main in meta-pytorch/torchtune PR #1778); Llama-3-8B's
generation_config.json (bos 128000, eos 128001, do_sample, T 0.6, top-p 0.9, max_length 4096, 4.40.0.dev0; copies
GMQs/Meta-Llama-3-8B, Undi95/Meta-Llama-3-8B-hf) and special_tokens_map (BOS/EOS, no PAD); deepseek-7b-v1.5's
generation_config.json (bos 100000, eos 100001; deepseek-ai page) and config.json (4096 positions, rope_scaling null,
rope_theta 10000.0, vocab 102400, 30 layers; copy Fsoft-AIC/XMAiNframe-base-7b); its tokenizer_config.json (EOS
"<|EOT|>", PAD end-of-sentence, add_bos_token, model_max_length 4096, LlamaTokenizerFast; copy
TechxGenus/deepseek-coder-7b-base-v1.5-AQLM, 772 bytes like the hub's file); codebert-base's file list (vocab.json,
merges.txt, special_tokens_map.json, a 25-byte tokenizer_config.json, no tokenizer.json); a DeepSeek tokenizer.json
whose post-processor adds the BOS. From utils/registry.py: phi-2's and deepseek-1.3b's architecture values. Recalled,
not seen (assumed): the other tokenizer_config.json fields, that "<|EOT|>" is a special added token, and Llama-3's
tokenizer_config.json.
"""
from __future__ import annotations

import json
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from utils.models import TINY_TOKENIZER_FILE

DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
_SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)


def _bytelevel_backend(specials: list[str]) -> tuple[Tokenizer, dict[str, int]]:
    """The project's byte-level BPE with the model's special-token strings added (ids after the BPE's)."""
    backend = Tokenizer.from_file(str(TINY_TOKENIZER_FILE))
    backend.add_special_tokens(specials)
    return backend, {s: backend.token_to_id(s) for s in specials}


def _metaspace_backend(specials: list[str]) -> tuple[Tokenizer, dict[str, int]]:
    """A SentencePiece-style BPE (Metaspace, byte fallback; ``<unk>``, ``<s>``, ``</s>`` at 0-2), as Phi-3 has."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    corpus = [p.read_text() for p in sorted(pathlib.Path(__file__).parents[1].glob("utils/*.py"))[:8]]
    backend.train_from_iterator(corpus, trainer)
    backend.add_special_tokens([s for s in specials if s not in ("<unk>", "<s>", "</s>")])
    return backend, {s: backend.token_to_id(s) for s in specials}


def _bos_template(backend: Tokenizer, bos: str, ids: dict[str, int], keep_bytelevel: bool = True) -> None:
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, ids[bos])])
    backend.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
                              if keep_bytelevel else template)


def _write(path: pathlib.Path, name: str, value: dict) -> None:
    (path / name).write_text(json.dumps(value, indent=2))


def _save_model(path: pathlib.Path, config: dict, auto=AutoModelForCausalLM) -> None:
    """Random weights for ``config`` (saved by save_pretrained), then config.json replaced by the hub-like dict."""
    path.mkdir(parents=True, exist_ok=True)
    _write(path, "config.json", config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.save_pretrained(path)
    for stale in ("config.json", "generation_config.json"):
        (path / stale).unlink(missing_ok=True)
    _write(path, "config.json", config)


# ----------------------------------------------------------------------------------------- foundation models
def phi2(path: pathlib.Path) -> pathlib.Path:
    """microsoft/phi-2: one ``<|endoftext|>`` for BOS/EOS/UNK, no PAD, no BOS added; config has no pad_token_id."""
    backend, ids = _bytelevel_backend(["<|endoftext|>"])
    eot = ids["<|endoftext|>"]
    _save_model(path, dict(
        _name_or_path="microsoft/phi-2", architectures=["PhiForCausalLM"], attention_dropout=0.0, bos_token_id=eot,
        embd_pdrop=0.0, eos_token_id=eot, hidden_act="gelu_new", hidden_size=64, initializer_range=0.02,
        intermediate_size=128, layer_norm_eps=1e-05, max_position_embeddings=2048, model_type="phi",
        num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=4, partial_rotary_factor=0.4,
        qk_layernorm=False, resid_pdrop=0.1, rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=False,
        torch_dtype="float16", transformers_version="4.37.0", use_cache=True, vocab_size=backend.get_vocab_size() + 61))
    _write(path, "generation_config.json", {"_from_model_config": True, "bos_token_id": eot, "eos_token_id": eot,
                                            "transformers_version": "4.37.0"})
    backend.save(str(path / "tokenizer.json"))
    _write(path, "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": True,
        "eos_token": "<|endoftext|>", "model_max_length": 2048, "tokenizer_class": "CodeGenTokenizer",
        "unk_token": "<|endoftext|>"})
    return path


def phi3(path: pathlib.Path) -> pathlib.Path:
    """microsoft/Phi-3-mini-4k-instruct: SentencePiece-style, PAD = EOS = ``<|endoftext|>``, generation EOS list."""
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>"]
    backend, ids = _metaspace_backend(specials)
    _bos_template(backend, "<s>", ids, keep_bytelevel=False)
    eot = ids["<|endoftext|>"]
    _save_model(path, dict(
        _name_or_path="Phi-3-mini-4k-instruct", architectures=["Phi3ForCausalLM"], attention_dropout=0.0,
        auto_map={"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        bos_token_id=ids["<s>"], embd_pdrop=0.0, eos_token_id=eot, hidden_act="silu", initializer_range=0.02,
        max_position_embeddings=4096, model_type="phi3", original_max_position_embeddings=4096, pad_token_id=eot,
        resid_pdrop=0.0, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=10000.0, sliding_window=2047,
        tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.40.2", use_cache=True,
        attention_bias=False, vocab_size=backend.get_vocab_size() + 58, **_SMALL_LLAMA))
    _write(path, "generation_config.json", {
        "_from_model_config": True, "bos_token_id": ids["<s>"],
        "eos_token_id": [eot, ids["<|assistant|>"], ids["<|end|>"]], "pad_token_id": eot,
        "transformers_version": "4.40.2"})
    backend.save(str(path / "tokenizer.json"))
    _write(path, "tokenizer_config.json", {  # add_bos_token false, as the hub file (docstring)
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "legacy": False, "model_max_length": 4096, "pad_token": "<|endoftext|>",
        "padding_side": "left", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False})
    return path


def _deepseek(path: pathlib.Path, config: dict, max_len: int, eos: str = DS_EOS) -> pathlib.Path:
    """``eos``: tokenizer_config.json's EOS; config.json's and generation_config.json's stay ``DS_EOS``."""
    backend, ids = _bytelevel_backend([DS_BOS, DS_EOS] + ([eos] if eos != DS_EOS else []))
    _bos_template(backend, DS_BOS, ids)
    _save_model(path, dict(
        architectures=["LlamaForCausalLM"], attention_bias=False, bos_token_id=ids[DS_BOS], eos_token_id=ids[DS_EOS],
        hidden_act="silu", initializer_range=0.02, model_type="llama", pretraining_tp=1, rms_norm_eps=1e-06,
        tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.33.1", use_cache=True,
        vocab_size=backend.get_vocab_size() + 6, **_SMALL_LLAMA, **config))
    _write(path, "generation_config.json", {"_from_model_config": True, "bos_token_id": ids[DS_BOS],
                                            "eos_token_id": ids[DS_EOS], "transformers_version": "4.33.1"})
    backend.save(str(path / "tokenizer.json"))
    _write(path, "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": DS_BOS, "clean_up_tokenization_spaces": False,
        "eos_token": eos, "legacy": True, "model_max_length": max_len, "pad_token": DS_EOS, "sp_model_kwargs": {},
        "unk_token": None, "tokenizer_class": "LlamaTokenizerFast"})
    return path


def deepseek_1_3b(path: pathlib.Path) -> pathlib.Path:
    """deepseek-ai/deepseek-coder-1.3b-base: linear RoPE scaling (factor 4), BOS added, PAD = EOS."""
    return _deepseek(path, dict(max_position_embeddings=16384, rope_theta=100000,
                                rope_scaling={"factor": 4.0, "type": "linear"}), 16384)


def deepseek_7b(path: pathlib.Path) -> pathlib.Path:
    """deepseek-ai/deepseek-coder-7b-base-v1.5: no RoPE scaling, 4k positions; the tokenizer's EOS is ``<|EOT|>``,
    not the config's ``<｜end▁of▁sentence｜>`` (which stays PAD)."""
    return _deepseek(path, dict(max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None), 4096,
                     eos="<|EOT|>")


def llama3_8b(path: pathlib.Path) -> pathlib.Path:
    """meta-llama/Meta-Llama-3-8B: BOS added by the tokenizer's post-processor, no PAD, sampling generation config."""
    backend, ids = _bytelevel_backend(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    _bos_template(backend, "<|begin_of_text|>", ids)
    bos, eos = ids["<|begin_of_text|>"], ids["<|end_of_text|>"]
    _save_model(path, dict(
        architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=bos,
        eos_token_id=eos, hidden_act="silu", initializer_range=0.02, max_position_embeddings=8192,
        model_type="llama", num_key_value_heads=2, pretraining_tp=1, rms_norm_eps=1e-05, rope_scaling=None,
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.40.0.dev0",
        use_cache=True, vocab_size=backend.get_vocab_size(),
        **{k: v for k, v in _SMALL_LLAMA.items() if k != "num_key_value_heads"}))
    _write(path, "generation_config.json", {"bos_token_id": bos, "do_sample": True, "eos_token_id": eos,
                                            "max_length": 4096, "temperature": 0.6, "top_p": 0.9,
                                            "transformers_version": "4.40.0.dev0"})
    backend.save(str(path / "tokenizer.json"))
    _write(path, "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True, "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    return path


# ------------------------------------------------------------------------------------------------- encoders
def codebert_base(path: pathlib.Path) -> pathlib.Path:
    """microsoft/codebert-base: RoBERTa with a pooler, vocab.json + merges.txt and no tokenizer.json."""
    backend, ids = _bytelevel_backend(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    _save_model(path, dict(
        architectures=["RobertaModel"], attention_probs_dropout_prob=0.1, bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"], hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=48, initializer_range=0.02,
        intermediate_size=96, layer_norm_eps=1e-05, max_position_embeddings=514, model_type="roberta",
        num_attention_heads=4, num_hidden_layers=2, output_past=True, pad_token_id=ids["<pad>"], type_vocab_size=1,
        vocab_size=backend.get_vocab_size()), auto=AutoModel)
    model = json.loads(backend.to_str())["model"]
    _write(path, "vocab.json", model["vocab"] | ids)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    _write(path, "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                             "sep_token": "</s>", "pad_token": "<pad>", "cls_token": "<s>",
                                             "mask_token": "<mask>"})
    return path


FOUNDATION_BUILDERS = {"phi-2": phi2, "phi-3": phi3, "deepseek-coder-1.3b-base": deepseek_1_3b,
                       "deepseek-coder-7b-base": deepseek_7b, "Meta-Llama-3-8B": llama3_8b}
