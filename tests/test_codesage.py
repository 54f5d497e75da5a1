"""CodeSage encoders load without remote code (utils/codesage.py), from a checkpoint in the hub's layout."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from custom_peft import build_model
from utils.codesage import CodeSageEncoder
from utils.errors import UserError
from utils.batching import encoder_ids
from utils.encoders import load_encoder, load_encoder_tokenizer
from utils.models import TINY_TOKENIZER_FILE

CONFIG = {"model_type": "codesage", "vocab_size": 2048, "max_position_embeddings": 64, "hidden_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
          "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02}


def _hub_tokenizer_files(directory) -> None:
    """The tokenizer files as the hub's CodeSage has them: a GPT-2-style vocab.json + merges.txt and a
    tokenizer_config.json naming the remote ``CodeSageTokenizer`` (its code file is absent here: nothing may run it)."""
    model = json.loads(Tokenizer.from_file(str(TINY_TOKENIZER_FILE)).to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CodeSageTokenizer", "add_eos_token": True,
        "auto_map": {"AutoTokenizer": ["tokenization_codesage.CodeSageTokenizer", None]},
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random CodeSage in the hub's layout: config.json, weights under the masked-LM class's 'transformer.'
    prefix plus its lm_head, and a tokenizer."""
    directory = tmp_path_factory.mktemp("codesage")
    model = CodeSageEncoder(CONFIG)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = 0.3 * torch.randn(tensor.shape, generator=generator)
        state["transformer." + name] = (noise + 1.0) if name.endswith("ln_1.weight") or name.endswith(
            "ln_2.weight") or name.endswith("ln_f.weight") else noise
    state["lm_head.weight"] = torch.randn(CONFIG["vocab_size"], CONFIG["hidden_size"], generator=generator)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    _hub_tokenizer_files(directory)
    return directory, {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}


def reference_forward(w: dict, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The architecture written out step by step, with an explicit softmax (the module uses SDPA)."""
    d, heads = CONFIG["hidden_size"], CONFIG["num_attention_heads"]
    x = w["wte.weight"][ids] + w["wpe.weight"][torch.arange(ids.shape[1])]
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0

    def norm(t, name):
        return torch.nn.functional.layer_norm(t, (d,), w[name + ".weight"], w[name + ".bias"], 1e-5)

    for i in range(CONFIG["num_hidden_layers"]):
        p = f"h.{i}."
        qkv = norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (t.view(*ids.shape, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + bias, dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(*ids.shape, d) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        hidden = norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
        gelu = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
        x = x + gelu @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = norm(x, "ln_f")
    pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
    return x, pooled


def test_codesage_loads_from_its_checkpoint_and_computes_the_architecture(checkpoint):
    directory, weights = checkpoint
    encoder, tok = load_encoder("codesage-small", enc_model_path=str(directory))
    assert encoder.hidden_size == 32 and encoder.pooling == "pooler_l2"
    ids = torch.randint(5, 2048, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    hidden, pooled = reference_forward(weights, ids, mask)
    out = encoder.backbone(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[keep], hidden[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoder(ids, mask), torch.nn.functional.normalize(pooled, dim=1), rtol=1e-4, atol=1e-5)
    assert pooled.abs().max() > 0.1 and not torch.allclose(pooled[0], pooled[2], atol=1e-3)


def test_lopa_builds_on_a_codesage_encoder_and_names_a_broken_checkpoint(checkpoint, tmp_path):
    directory, _ = checkpoint
    model, _ = build_model("lopa", "tiny-llama", enc_model_type="codesage-small", enc_model_path=str(directory),
                           num_virtual_tokens=4, lp_rank=2)
    assert model.meta["encoder_hidden_size"] == 32 and model.prompt.enc_dim == 32
    code = "def f(x):\n    return x + 12345"  # the model carries the encoder's tokenizer (callers do not reload it)
    assert model.enc_tokenizer(code)["input_ids"] == load_encoder_tokenizer("codesage-small", str(directory))(
        code)["input_ids"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (broken / name).write_bytes((directory / name).read_bytes())
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    state.pop("transformer.ln_f.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=r"broken: not a CodeSage checkpoint .*1 missing weights, e\.g\. \['ln_f"):
        load_encoder("codesage-small", enc_model_path=str(broken))


def test_codesage_dropout_acts_in_train_mode_only_where_the_authors_put_it(checkpoint):
    """Embedding, attention-probability and both residual dropouts (0.1 each by default): train mode gives other
    hidden states each call; eval mode is the deterministic architecture above; p = 0 in train mode equals eval."""
    directory, weights = checkpoint
    encoder, _ = load_encoder("codesage-small", enc_model_path=str(directory))
    backbone = encoder.backbone
    assert backbone.drop.p == 0.1 and backbone.h[0].resid_drop.p == 0.1 and backbone.h[0].attn_p == 0.1
    ids = torch.randint(5, 2048, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    backbone.train()
    torch.manual_seed(0)
    a, b = backbone(input_ids=ids, attention_mask=mask), backbone(input_ids=ids, attention_mask=mask)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() > 1e-3
    hidden, _ = reference_forward(weights, ids, mask)
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for block in backbone.h:
        block.attn_p = 0.0
    torch.testing.assert_close(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, hidden, rtol=1e-4,
                               atol=1e-5)
    backbone.eval()
    torch.testing.assert_close(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, hidden, rtol=1e-4,
                               atol=1e-5)


def test_codesage_tokenizer_loads_without_its_remote_code_as_a_gpt2_bpe(checkpoint):
    """The hub names a remote CodeSageTokenizer (a transformers-4 GPT2Tokenizer); transformers' own GPT2Tokenizer
    reads the same vocab.json + merges.txt. Encoder inputs are the plain BPE ids: no CLS/SEP, no EOS (spec §4.1)."""
    directory, _ = checkpoint
    text = 'def add(a, b):\n    """Return a + b, e.g. add(12, 30) == 42."""\n'
    raw = Tokenizer.from_file(str(TINY_TOKENIZER_FILE)).encode(text).ids  # the same BPE, GPT-2 pre-tokenization
    for tok in (load_encoder_tokenizer("codesage-small", str(directory)),
                load_encoder("codesage-small", enc_model_path=str(directory))[1]):
        assert encoder_ids(text, tok) == raw and encoder_ids(text, tok, max_tokens=5) == raw[-5:]
        assert tok.pad_token == tok.eos_token == "<|endoftext|>"
