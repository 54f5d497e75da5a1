import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.errors import UserError
from utils.encoders import load_encoder
from utils.models import TINY_MODEL_TYPES, load_foundation_model, load_tokenizer, model_config
from utils.registry import ENCODERS, FOUNDATION_MODELS, get_encoder_spec, get_model_spec

PAPER_MODELS = ["phi-2", "phi-3", "codegen-350M", "codegen2-3_7B", "deepseek-coder-1.3b-base",
                "deepseek-coder-7b-base", "Meta-Llama-3-8B"]


def test_every_paper_model_has_an_id_and_lora_targets():
    for name in PAPER_MODELS:
        spec = get_model_spec(name)
        assert spec.hf_id and "/" in spec.hf_id
        assert spec.lora_targets and all(isinstance(t, str) for t in spec.lora_targets)
        assert spec.hidden_size > 0
    assert get_model_spec("deepseek-coder-7b-base").hf_id.endswith("-v1.5")
    assert get_model_spec("phi-2").lora_targets == ("q_proj", "k_proj", "v_proj")
    assert get_model_spec("phi-3").lora_targets == ("qkv_proj",)


# The transformers class each hub checkpoint loads as (its config.json's model_type), by its tiny same-family model.
HUB_FAMILY = {"phi-2": "tiny-phi-2", "phi-3": "tiny-phi-3", "codegen-350M": "tiny-codegen",
              "codegen2-3_7B": "tiny-codegen", "deepseek-coder-1.3b-base": "tiny-llama",
              "deepseek-coder-7b-base": "tiny-llama", "Meta-Llama-3-8B": "tiny-llama"}


@pytest.mark.parametrize("model_type", PAPER_MODELS)
def test_lora_targets_are_every_layers_attention_input_projections_in_the_real_architecture(model_type):
    """spec §1.5: the original's targets name real modules: LoRA built as training builds it (on the meta device;
    the real sizes where the registry has them, else the family's tiny stand-in, the same transformers class)
    adapts q/k/v, or the fused qkv, of every layer and nothing else; r·(in+out) parameters each (spec §10.4)."""
    from peft.tuners.lora import LoraLayer

    from custom_peft import MethodConfig, count_trainable
    from custom_peft.build import _wrap

    spec = get_model_spec(model_type)
    arch_spec = spec if spec.arch else get_model_spec(HUB_FAMILY[model_type])
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model_config(arch_spec))
        if spec.arch:  # the real architecture is the class its family's stand-in tests
            assert lm.config.model_type == get_model_spec(HUB_FAMILY[model_type]).arch["model_type"]
        model = _wrap(MethodConfig("lora"), model_type, lm, dtype="fp32")
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    layers = lm.config.num_hidden_layers
    assert sorted(name.rsplit(".", 1)[1] for name in adapted) == sorted(spec.lora_targets * layers)
    assert all(".self_attn." in name or ".attn." in name for name in adapted)
    assert count_trainable(model) == sum(16 * (m.in_features + m.out_features) for m in adapted.values())


def test_every_encoder_has_an_id_and_pooling():
    expected = {"codebert-base": "cls", "codesage-small": "pooler_l2", "codesage-base": "pooler_l2",
                "codesage-large": "pooler_l2", "tiny-roberta": "cls", "minilm": "mean_l2"}
    for name, pooling in expected.items():
        assert get_encoder_spec(name).pooling == pooling
    for name in ("codebert-base", "codesage-small", "codesage-base", "codesage-large"):
        assert ENCODERS[name].hf_id
    assert get_encoder_spec("codesage-small").hidden_size == 1024


@pytest.mark.parametrize("bad, getter", [("gpt-9", get_model_spec), ("bert-huge", get_encoder_spec)])
def test_unknown_names_list_the_choices(bad, getter):
    with pytest.raises(UserError) as err:
        getter(bad)
    assert bad in str(err.value) and "tiny-" in str(err.value)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_tiny_models_forward_backward_generate(model_type):
    model, tok = load_foundation_model(model_type, seed=3)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert 2 <= model.config.num_hidden_layers <= 4
    batch = tok(["def add(a, b):\n    return a + b", "x = 1"], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert torch.isfinite(out.loss) and 6.0 < out.loss.item() < 9.0  # ~ln(2048)=7.6 for a random model
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    new = model.generate(**tok(["def f(x):"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert new.shape[1] == len(tok("def f(x):")["input_ids"]) + 4
    # deterministic for a seed, different across seeds
    again, _ = load_foundation_model(model_type, seed=3)
    other, _ = load_foundation_model(model_type, seed=4)
    first = next(model.parameters())
    assert torch.equal(first, next(again.parameters()))
    assert not torch.equal(first, next(other.parameters()))


def test_bos_adding_tiny_tokenizers_behave_like_llama_ones():
    llama_tok, phi_tok = load_tokenizer("tiny-llama"), load_tokenizer("tiny-phi-2")
    assert llama_tok("x")["input_ids"][0] == llama_tok.bos_token_id
    assert phi_tok("x")["input_ids"][0] != phi_tok.bos_token_id
    assert phi_tok.pad_token_id == phi_tok.eos_token_id == phi_tok.bos_token_id
    text = "def f(x):\n\treturn [x, 'é']"
    assert phi_tok.decode(phi_tok(text)["input_ids"]) == text


def test_model_dtype_is_applied():
    model, _ = load_foundation_model("tiny-llama", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="dtype"):
        load_foundation_model("tiny-llama", dtype="fp8")


def test_tiny_roberta_and_minilm_encoders_pool_as_registered():
    enc, tok = load_encoder("tiny-roberta", seed=0)
    batch = tok(["def f(): pass", "x"], return_tensors="pt", padding=True)
    out = enc(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, enc.hidden_size) and not out.requires_grad
    assert all(not p.requires_grad for p in enc.parameters())
    full = enc.backbone(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(out, full)

    enc, tok = load_encoder("minilm")
    batch = tok(["sort a list of numbers", "sort a list of integers", "the weather is cold"], return_tensors="pt",
                padding=True)
    emb = enc(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # a real pretrained model: paraphrases are closer than unrelated text
    assert (emb[0] @ emb[1]).item() > (emb[0] @ emb[2]).item() + 0.2


def test_offline_hub_model_fails_fast_naming_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_foundation_model("deepseek-coder-1.3b-base")
    msg = str(err.value)
    assert "deepseek-ai/deepseek-coder-1.3b-base" in msg and "--model_path" in msg and "tiny-llama" in msg
    with pytest.raises(UserError, match="--enc_model_path"):
        load_encoder("codesage-small")


def test_registry_has_all_tiny_types():
    assert set(TINY_MODEL_TYPES) <= set(FOUNDATION_MODELS)


@pytest.mark.parametrize("model_type,params", [
    ("phi-2", 2_779_683_840), ("deepseek-coder-1.3b-base", 1_346_471_936), ("Meta-Llama-3-8B", 8_030_261_248)])
def test_benchmark_architectures_have_the_published_parameter_counts(model_type, params):
    """The benchmarks build these from registry values with random weights; counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(get_model_spec(model_type)))
    assert sum(p.numel() for p in model.parameters()) == params


def test_a_codegen_checkpoint_whose_config_has_no_pad_token_id_loads(tmp_path):
    # Salesforce/codegen-350M-mono's config.json has no pad_token_id, and transformers 5's CodeGenConfig no such field
    from transformers import CodeGenConfig, CodeGenForCausalLM

    from utils.models import tiny_tokenizer

    tok = tiny_tokenizer("gpt")
    config = CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64, vocab_size=len(tok))
    assert not hasattr(config, "pad_token_id")
    CodeGenForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok = load_foundation_model("codegen-350M", model_path=str(tmp_path))
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id is not None


def test_a_model_path_with_broken_tokenizer_files_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut off mid-write
    with pytest.raises(UserError, match=rf"^{tmp_path}: its tokenizer files do not load \(.*save_pretrained"):
        load_tokenizer("phi-2", model_path=str(tmp_path))


def test_a_local_model_of_another_architecture_is_refused_before_it_loads_and_another_width_warned(tmp_path, caplog):
    """--model_path was trusted: a Llama directory under --model_type phi-2 was tuned and reported as phi-2, with
    phi-2's BOS rule and LoRA targets."""
    import json

    from utils.models import check_local_model_fits

    llama, tok = load_foundation_model("tiny-llama")
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match=r"a 'llama' model \(config.json\), but --model_type tiny-phi-2 is a 'phi' "
                                        r"one; pass the --model_type of this model"):
        load_foundation_model("tiny-phi-2", model_path=str(tmp_path / "llama"))
    assert load_foundation_model("tiny-llama", model_path=str(tmp_path / "llama"))[0].config.model_type == "llama"
    for name, config in {"small-phi": {"model_type": "phi", "hidden_size": 64},
                         "codegen": {"model_type": "codegen", "n_embd": 1024}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    check_local_model_fits(str(tmp_path / "small-phi"), get_model_spec("phi-2"))  # a smaller variant, say
    assert "small-phi: width 64 (config.json), but phi-2 has width 2560: not the model of that name" in caplog.text
    caplog.clear()
    check_local_model_fits(str(tmp_path / "codegen"), get_model_spec("codegen-350M"))  # fits
    assert caplog.text == ""
    with pytest.raises(UserError, match="a 'codegen' model"):
        check_local_model_fits(str(tmp_path / "codegen"), get_model_spec("deepseek-coder-7b-base"))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_bare_architecture_for_a_full_checkpoint_is_the_loaded_models(model_type, dtype, tmp_path):
    """generate_preds builds the bare architecture for an FFT state file or shards (the base's weights unread):
    buffers, dtypes, config and outputs must be from_pretrained's. Built under a bf16 default dtype, CodeGen's
    rotary table came out rounded, and other greedy completions with it."""
    from safetensors.torch import save_file

    from utils.generation import load_fft_weights

    model, tok = load_foundation_model(model_type, seed=3)
    model.save_pretrained(tmp_path / "model")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "full.safetensors"))
    loaded, _ = load_foundation_model(model_type, model_path=str(tmp_path / "model"), dtype=dtype)
    bare, _ = load_foundation_model(model_type, model_path=str(tmp_path / "model"), dtype=dtype, empty_weights=True)
    load_fft_weights(bare, state_dict_file=str(tmp_path / "full.safetensors"))
    want, got = dict(loaded.named_buffers()), dict(bare.named_buffers())
    assert want.keys() == got.keys()
    for name, buffer in want.items():
        assert buffer.dtype == got[name].dtype and torch.equal(buffer, got[name]), name
    assert {k: p.dtype for k, p in loaded.named_parameters()} == {k: p.dtype for k, p in bare.named_parameters()}
    assert bare.config.to_dict() == loaded.config.to_dict()
    ids = torch.tensor([tok("def f(x):\n    return x + 1\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(bare.eval()(ids).logits, loaded.eval()(ids).logits)


def test_the_bare_architecture_takes_the_checkpoints_generation_config_before_the_bases(tmp_path):
    """A checkpoint directory with its own config.json and generation_config.json (config_dir) and a --model_path
    base with another: the checkpoint's generation config is the one used, as from_pretrained of that directory
    would read it; without one there, the base's."""
    import json

    model, tok = load_foundation_model("tiny-llama", seed=3)
    model.generation_config.repetition_penalty = 1.5
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())

    def penalty():
        bare, _ = load_foundation_model("tiny-llama", model_path=str(tmp_path / "base"), empty_weights=True,
                                        config_dir=str(tmp_path / "ckpt"))
        return bare.generation_config.repetition_penalty

    assert penalty() == 1.5  # none in the checkpoint: the base's
    generation = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 1.2}))
    assert penalty() == 1.2
