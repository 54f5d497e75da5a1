"""CodeGen2 loads on transformers' CodeGen class: its 8-shard fused qkv rows are reordered once (utils/codegen2.py)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, CodeGenConfig, CodeGenForCausalLM

from utils.codegen2 import LAYOUT_KEY, qkv_row_order
from utils.errors import UserError
from utils.models import load_foundation_model, tiny_tokenizer


def _split(y: torch.Tensor, shards: int):
    """Query, value and key of a fused qkv output laid out over ``shards`` (as CodeGen's attention reads it)."""
    e = y.shape[-1] // 3
    parts = y.view(*y.shape[:-1], shards, 3, e // shards)
    return [parts[..., :, i, :].reshape(*y.shape[:-1], e) for i in range(3)]


def test_reordered_rows_give_every_projection_the_same_values():
    torch.manual_seed(0)
    e, d = 64, 24
    weight, x = torch.randn(3 * e, d), torch.randn(5, d)
    order = qkv_row_order(e, 8)
    assert sorted(order.tolist()) == list(range(3 * e)) and order.tolist() != list(range(3 * e))
    for want, got in zip(_split(x @ weight.T, 8), _split(x @ weight[order].T, 4)):
        assert torch.equal(want, got)
    assert qkv_row_order(e, 4).tolist() == list(range(3 * e))


def _hub_like_checkpoint(path):
    """A tiny CodeGen2-shaped checkpoint as the hub has it (8-shard rows, auto_map) and its outputs as CodeGen2."""
    tok = tiny_tokenizer("gpt")
    cfg = CodeGenConfig(n_embd=64, n_layer=2, n_head=8, head_dim=8, rotary_dim=4, n_positions=256, n_ctx=256,
                        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    model = CodeGenForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_codegen.CodeGenForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    attentions = [block.attn for block in model.transformer.h]
    if not all(hasattr(a, "mp_num") for a in attentions):
        pytest.skip("this transformers' CodeGen attention has no mp_num attribute to read the 8-shard layout with")
    for a in attentions:
        a.mp_num = 8  # transformers' CodeGen read with the remote code's shard count: the reference outputs
    ids = tok(["def add(a, b):\n    return a + b\n", "x = [i * i for i in range(9)]"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        reference = model(**ids).logits
    return ids, reference


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(**ids).logits


def test_codegen2_checkpoint_loads_natively_with_its_outputs_and_saves_a_copy_that_reloads(tmp_path):
    hub, copy = tmp_path / "hub", tmp_path / "copy"
    ids, reference = _hub_like_checkpoint(hub)
    # Read with transformers' own 4-shard layout, the checkpoint is another model: the reordering is needed.
    assert (_logits(AutoModelForCausalLM.from_pretrained(hub), ids) - reference).abs().max() > 1e-2
    model, tok = load_foundation_model("codegen2-3_7B", model_path=str(hub))
    assert type(model) is CodeGenForCausalLM
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-5)
    # A saved copy (as FFT's final/) records its layout, cannot reach the remote code, and is not reordered again.
    model.save_pretrained(copy)
    tok.save_pretrained(copy)
    saved = json.loads((copy / "config.json").read_text())
    assert saved[LAYOUT_KEY] == 4 and "auto_map" not in saved
    again, _ = load_foundation_model("codegen2-3_7B", model_path=str(copy))
    torch.testing.assert_close(_logits(again, ids), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(copy), ids), reference, rtol=0, atol=1e-5)


def test_another_architecture_given_as_codegen2_is_refused(tmp_path):
    model, tok = load_foundation_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path}: a 'llama' model \\(config.json\\), but --model_type "
                                        f"codegen2-3_7B is a 'codegen' one"):
        load_foundation_model("codegen2-3_7B", model_path=str(tmp_path))
