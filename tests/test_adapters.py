"""Adapter directories: save → load round trips, file contents, config fields, peft compatibility, mismatches."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from custom_peft import (build_model, count_trainable, idpg_trainable_count, load_tuned_model, lopa_trainable_count,
                         read_adapter_config, save_adapter, trainable_state_dict)
from utils.batching import Collator
from utils.errors import UserError
from utils.encoders import load_encoder_tokenizer
from utils.models import TINY_MODEL_TYPES, load_foundation_model

M, R, D, ENC_DIM = 4, 2, 64, 48
PROMPTS = ["def add(a, b):\n    return", "x = [i * i for i in range(10)]\nprint(x", "import os"]


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(method: str, model_type: str = "tiny-llama", enc: str = "tiny-roberta"):
    """A fresh model whose trainable tensors moved off their init (as after training)."""
    model, tok = build_model(method, model_type, num_virtual_tokens=M, lp_rank=R, enc_model_type=enc, seed=7)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((0.01 if method == "fft" else 0.2) * torch.randn(p.shape, generator=generator))
    return model.eval(), tok


def left_batch(tok, enc: str = "tiny-roberta") -> dict:
    enc_tok = load_encoder_tokenizer(enc)
    examples = [{"task_id": str(i), "input_ids": tok(t)["input_ids"], "enc_input_ids": enc_tok(t)["input_ids"]}
                for i, t in enumerate(PROMPTS)]
    batch = Collator(tok.pad_token_id, enc_tok.pad_token_id, padding_side="left")(examples)
    batch.pop("task_ids")
    return batch


def assert_same_model(a, b, batch):
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(a.generate(**batch, **kwargs), b.generate(**batch, **kwargs))


def tensors_in(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", ("lora", "pt", "idpg", "lopa"))
def test_save_then_load_gives_identical_logits_and_generations(method, model_type, tmp_path):
    model, tok = trained(method, model_type)
    save_adapter(model, tmp_path)
    loaded, loaded_tok = load_tuned_model(tmp_path)
    assert loaded.method == method and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab()
    if method in ("idpg", "lopa"):
        assert loaded.enc_tokenizer.get_vocab() == load_encoder_tokenizer("tiny-roberta").get_vocab()
    else:
        assert model.enc_tokenizer is None and loaded.enc_tokenizer is None
    saved = {k: v.detach() for k, v in trainable_state_dict(model).items()}
    assert all(torch.equal(saved[k], v) for k, v in trainable_state_dict(loaded).items())
    assert_same_model(model, loaded, left_batch(tok))


@pytest.mark.parametrize("method", ("lora", "pt", "lopa"))
def test_bf16_base_trains_saves_and_loads_fp32_adapter_tensors(method, tmp_path):
    model, tok = build_model(method, "tiny-phi-3", num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                             seed=7, dtype="bf16")
    assert {p.dtype for p in model.lm.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for _, p in model.trainable_named_parameters()} == {torch.float32}
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    loaded, _ = load_tuned_model(tmp_path, dtype="bf16")
    assert next(loaded.lm.parameters()).dtype == torch.bfloat16
    assert_same_model(model.eval(), loaded, left_batch(tok))


def test_fft_directory_is_a_whole_model_and_loads_back(tmp_path):
    model, tok = trained("fft", "tiny-phi-2")
    save_adapter(model, tmp_path, extra={"epochs": 1})
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "adapter_config.json").exists()  # else from_pretrained would take it for a peft adapter
    assert read_adapter_config(tmp_path)["epochs"] == 1
    loaded, _ = load_tuned_model(tmp_path)
    assert loaded.method == "fft" and count_trainable(loaded) == count_trainable(model)
    assert_same_model(model, loaded, left_batch(tok))
    plain, _ = load_foundation_model("tiny-phi-2", model_path=str(tmp_path))  # the documented FFT path
    assert torch.equal(plain.lm_head.weight, model.lm.lm_head.weight)
    with pytest.raises(ValueError, match="none"):
        save_adapter(build_model("none", "tiny-phi-2")[0], tmp_path / "none")


def test_an_adapter_trained_on_a_local_base_loads_that_base(tmp_path):
    """Training with --model_path records it as base_model_name_or_path; left out at load time, the registry's base
    (for a tiny type a random one) would silently replace it."""
    base, tok = trained("fft", "tiny-phi-2")
    base.lm.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = build_model("pt", "tiny-phi-2", num_virtual_tokens=M, model_path=str(tmp_path / "base"), seed=3)
    save_adapter(model, tmp_path / "adapter")
    loaded, _ = load_tuned_model(tmp_path / "adapter")
    assert torch.equal(loaded.lm.lm_head.weight, base.lm.lm_head.weight)
    assert_same_model(model.eval(), loaded, left_batch(tok))
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(UserError, match="field 'base_model_name_or_path' is .*base', the local model .* not there; "
                                        "pass --model_path"):
        load_tuned_model(tmp_path / "adapter")


def test_an_adapter_on_a_local_base_of_another_width_loads_with_its_model_type(tmp_path):
    """A smaller local variant: --model_type alone (the docs' way) used to be refused, the registry's width against
    the adapter's, with advice to pass the --model_type that was given."""
    import transformers

    base, tok = build_model("none", "tiny-phi-2", seed=3)
    config = transformers.PhiConfig(**{**base.lm.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    transformers.PhiForCausalLM(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = build_model("pt", "tiny-phi-2", num_virtual_tokens=M, model_path=str(tmp_path / "base"), seed=3)
    save_adapter(model, tmp_path / "adapter")
    loaded, _ = load_tuned_model(tmp_path / "adapter", "tiny-phi-2", method="pt")
    assert loaded.lm.config.hidden_size == 32
    assert_same_model(model.eval(), loaded, left_batch(tok))
    base.lm.save_pretrained(tmp_path / "wide")  # another base given: checked once loaded
    tok.save_pretrained(tmp_path / "wide")
    with pytest.raises(UserError, match="field 'hidden_size' is 32 but the base model 'tiny-phi-2' has width 64"):
        load_tuned_model(tmp_path / "adapter", "tiny-phi-2", model_path=str(tmp_path / "wide"))


def test_a_relative_local_base_and_encoder_are_recorded_absolute(tmp_path, monkeypatch):
    """--model_path base --enc_model_path enc given relative to the training directory: generation run from
    another directory must still find both (a relative record resolved against the wrong cwd)."""
    from utils.encoders import tiny_roberta

    base, tok = trained("fft", "tiny-phi-2")
    (tmp_path / "train").mkdir()
    base.lm.save_pretrained(tmp_path / "train" / "base")
    tok.save_pretrained(tmp_path / "train" / "base")
    encoder, enc_tok = tiny_roberta(seed=7)
    encoder.save_pretrained(tmp_path / "train" / "enc")
    enc_tok.save_pretrained(tmp_path / "train" / "enc")
    monkeypatch.chdir(tmp_path / "train")
    model, _ = build_model("lopa", "tiny-phi-2", num_virtual_tokens=M, enc_model_type="tiny-roberta",
                           model_path="base", enc_model_path="enc", seed=3)
    save_adapter(model, tmp_path / "adapter")
    config = read_adapter_config(tmp_path / "adapter")
    assert config["base_model_name_or_path"] == str(tmp_path / "train" / "base")
    assert config["enc_model_name_or_path"] == str(tmp_path / "train" / "enc")
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_tuned_model(tmp_path / "adapter")
    assert torch.equal(loaded.lm.lm_head.weight, base.lm.lm_head.weight)
    assert_same_model(model.eval(), loaded, left_batch(tok))


def test_an_adapter_trained_on_a_local_encoder_loads_that_encoder(tmp_path):
    """--enc_model_path at training, left out at load time: the registry's encoder (for tiny-roberta a random one,
    as wide) would silently make other instance prompts."""
    from utils.encoders import tiny_roberta

    encoder, enc_tok = tiny_roberta(seed=7)
    encoder.save_pretrained(tmp_path / "encoder")
    enc_tok.save_pretrained(tmp_path / "encoder")
    model, tok = build_model("lopa", "tiny-llama", num_virtual_tokens=M, enc_model_type="tiny-roberta",
                             enc_model_path=str(tmp_path / "encoder"), seed=3)
    save_adapter(model, tmp_path / "adapter")
    loaded, _ = load_tuned_model(tmp_path / "adapter")
    ours, saved = loaded.prompt.encoder.backbone.state_dict(), encoder.state_dict()
    assert len(saved) > 20 and all(torch.equal(ours[k], saved[k]) for k in saved)  # (AutoModel adds a pooler)
    assert_same_model(model.eval(), loaded, left_batch(tok))
    shutil.rmtree(tmp_path / "encoder")
    with pytest.raises(UserError, match="field 'enc_model_name_or_path' is .*encoder', the local model .* not there; "
                                        "pass --enc_model_path"):
        load_tuned_model(tmp_path / "adapter")


# ------------------------------------------------------------------------------------------- file contents
def test_lopa_file_holds_only_the_shared_prompt_and_heads(tmp_path):
    model, _ = trained("lopa")
    save_adapter(model, tmp_path)
    shapes = tensors_in(tmp_path / "adapter_model.safetensors")
    heads = {f"{h}.{layer}.{kind}" for h in ("row_head", "col_head") for layer in ("dense", "out_proj")
             for kind in ("weight", "bias")}
    assert set(shapes) == {"shared_prompt"} | heads
    assert shapes["shared_prompt"] == (M, D)
    assert shapes["row_head.out_proj.weight"] == (M * R, ENC_DIM)
    assert shapes["col_head.out_proj.weight"] == (D * R, ENC_DIM)
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    assert numel == count_trainable(model) == lopa_trainable_count(D, ENC_DIM, ENC_DIM, M, R)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 4 * numel < size < 4 * numel + 2048  # fp32 data plus a small JSON header, no encoder


def test_idpg_pt_and_lora_files_hold_only_their_trained_tensors(tmp_path):
    for method in ("idpg", "pt", "lora"):
        model, _ = trained(method)
        save_adapter(model, tmp_path / method)
        shapes = tensors_in(tmp_path / method / "adapter_model.safetensors")
        numel = sum(torch.Size(s).numel() for s in shapes.values())
        assert numel == count_trainable(model), method
        if method == "idpg":
            assert set(shapes) == {"head.dense.weight", "head.dense.bias", "head.out_proj.weight",
                                   "head.out_proj.bias"}
            assert numel == idpg_trainable_count(D, ENC_DIM, ENC_DIM, M)
        elif method == "pt":
            assert shapes == {"prompt_embeddings": (M, D)}
        else:
            assert all(".lora_A." in k or ".lora_B." in k for k in shapes) and len(shapes) == 3 * 3 * 2


def test_real_encoder_is_referenced_not_copied(tmp_path):
    model, tok = trained("lopa", "tiny-phi-3", enc="minilm")
    save_adapter(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    encoder = sum(p.numel() for p in model.prompt.encoder.parameters())
    assert count_trainable(model) == lopa_trainable_count(D, 384, 384, M, R)
    assert size < 4 * count_trainable(model) + 2048 < 4 * encoder / 10  # the 22.7M-parameter encoder is not in it
    assert read_adapter_config(tmp_path)["enc_model_type"] == "minilm"
    loaded, _ = load_tuned_model(tmp_path)
    assert_same_model(model, loaded, left_batch(tok, enc="minilm"))


def test_adapter_config_records_what_rebuilds_the_model(tmp_path):
    expected = {"library": "lopa-peft", "base_model_type": "tiny-llama", "hidden_size": D}
    for method in ("lora", "pt", "idpg", "lopa"):
        model, _ = trained(method)
        config = json.loads((save_adapter(model, tmp_path / method, extra={"lr": 1e-3}) /
                             "adapter_config.json").read_text())
        assert {k: config[k] for k in expected} == expected
        assert config["method"] == method and config["lr"] == 1e-3
        assert config["library_version"] and "base_model_name_or_path" in config
        if method != "lora":
            assert config["num_virtual_tokens"] == M
        if method in ("idpg", "lopa"):
            assert (config["enc_model_type"], config["encoder_hidden_size"], config["head_dim"]) == (
                "tiny-roberta", ENC_DIM, ENC_DIM)
        if method == "lopa":
            assert config["lp_rank"] == R
        if method in ("lora", "pt"):  # peft's own fields are there too
            assert config["peft_type"] == {"lora": "LORA", "pt": "PROMPT_TUNING"}[method]
        if method == "lora":
            assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.1)
            assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("method", ("lora", "pt"))
def test_plain_peft_loads_lora_and_pt_directories(method, tmp_path):
    model, tok = trained(method, "tiny-codegen")
    save_adapter(model, tmp_path)
    base, _ = load_foundation_model("tiny-codegen", seed=read_adapter_config(tmp_path)["base_seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it ignores the project's extra config fields
        theirs = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    batch = tok(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"]).logits
        peft_logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(peft_logits[:, -ours.shape[1]:], ours, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- mismatches
@pytest.fixture(scope="module")
def lopa_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lopa_adapter")
    save_adapter(trained("lopa")[0], directory)
    return directory


@pytest.mark.parametrize("kwargs, field", [
    ({"method": "pt"}, "method"),
    ({"num_virtual_tokens": 10}, "num_virtual_tokens"),
    ({"lp_rank": 1}, "lp_rank"),
    ({"enc_model_type": "minilm"}, "enc_model_type"),
    ({"model_type": "tiny-phi-2"}, "base_model_type"),  # same width, another model
    ({"model_type": "phi-2"}, "hidden_size"),  # caught from the registry, before any download
    ({"model_type": "deepseek-coder-1.3b-base"}, "hidden_size"),
])
def test_a_directory_that_does_not_fit_names_the_field(lopa_dir, kwargs, field):
    with pytest.raises(UserError) as err:
        load_tuned_model(lopa_dir, **kwargs)
    message = str(err.value)
    assert f"'{field}'" in message and "adapter_config.json" in message
    assert str(kwargs[next(iter(kwargs))]) in message


def _copy_with_config(src, dst, **changes):
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_size": 2560}, "'hidden_size' is 2560"),  # width of another model type
    ({"num_virtual_tokens": 5}, "'num_virtual_tokens'"),  # config and tensors disagree
    ({"lp_rank": 4}, "'lp_rank'"),
    ({"method": "idpg"}, "unexpected tensor"),
])
def test_an_edited_config_that_contradicts_the_tensors_fails_clearly(lopa_dir, tmp_path, changes, needle):
    with pytest.raises(UserError, match=needle):
        load_tuned_model(_copy_with_config(lopa_dir, tmp_path / "edited", **changes))


def test_an_encoder_of_another_width_is_named(lopa_dir):
    """--enc_model_path pointing at another encoder (all-MiniLM, 384 wide) for a 48-wide tiny-roberta adapter."""
    from utils.encoders import _minilm_path

    with pytest.raises(UserError, match="field 'encoder_hidden_size' is 48 but the encoder loaded for "
                                        "'tiny-roberta' has width 384; pass the --enc_model_path"):
        load_tuned_model(lopa_dir, enc_model_path=_minilm_path())


def test_missing_or_foreign_files_fail_clearly(lopa_dir, tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json; pass an adapter directory"):
        load_tuned_model(tmp_path)
    with pytest.raises(UserError, match="nowhere: no such directory"):
        load_tuned_model(tmp_path / "nowhere")
    shutil.copytree(lopa_dir, tmp_path / "run" / "final")
    with pytest.raises(UserError, match=f"this is a training log_dir: pass {tmp_path / 'run' / 'final'}$"):
        load_tuned_model(tmp_path / "run")
    (tmp_path / "config.json").write_text("{}")  # an fft final/ (a whole model) given as an adapter
    with pytest.raises(UserError, match="whole model directory .*--load_base_from_path"):
        load_tuned_model(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tuned_model(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(UserError, match="field 'method' is missing"):
        load_tuned_model(tmp_path)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "adapter_config.json").write_text((lopa_dir / "adapter_config.json").read_text())
    with pytest.raises(UserError, match="adapter_model.safetensors: missing"):
        load_tuned_model(only_config)


@pytest.mark.parametrize("damage", ["garbage", "half", "empty", "config_bytes"])
def test_a_damaged_adapter_file_is_one_line(lopa_dir, tmp_path, damage):
    """A cut or overwritten adapter_model.safetensors was a SafetensorError traceback; a config with
    non-UTF-8 bytes a UnicodeDecodeError."""
    shutil.copytree(lopa_dir, tmp_path / "a")
    weights, config = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    if damage == "config_bytes":
        config.write_bytes(b"\xff" + config.read_bytes())
        with pytest.raises(UserError, match=r"adapter_config\.json: not UTF-8 text .*; re-save the adapter"):
            load_tuned_model(tmp_path / "a")
        return
    body = weights.read_bytes()
    weights.write_bytes({"garbage": b"garbage\n", "half": body[:len(body) // 2], "empty": b""}[damage])
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: not a readable safetensors file \(.+\); "
                                        r"it is damaged or cut short: re-save the adapter"):
        load_tuned_model(tmp_path / "a")


@pytest.mark.parametrize("method", ("lopa", "idpg"))
def test_a_head_dim_other_than_the_encoder_width_builds_saves_and_loads(method, tmp_path):
    """``head_dim`` (h, the paper's GLUE setting h = 256 < H): heads dense(H, h) → out_proj(h, ·), the formula's count,
    and an adapter that loads back to the same model (the loader reads ``head_dim`` from the config)."""
    h = 16
    model, tok = build_model(method, "tiny-llama", num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                             head_dim=h, seed=7)
    heads = (model.prompt.row_head, model.prompt.col_head) if method == "lopa" else (model.prompt.head,)
    for hd in heads:
        assert (hd.dense.in_features, hd.dense.out_features, hd.out_proj.in_features) == (ENC_DIM, h, h)
    want = lopa_trainable_count(D, ENC_DIM, h, M, R) if method == "lopa" else idpg_trainable_count(D, ENC_DIM, h, M)
    assert count_trainable(model) == want
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_adapter(model.eval(), tmp_path)
    assert read_adapter_config(tmp_path)["head_dim"] == h
    loaded, _ = load_tuned_model(tmp_path)
    assert count_trainable(loaded) == want
    assert_same_model(model, loaded, left_batch(tok))


def test_an_adapter_file_without_one_of_its_tensors_is_refused(tmp_path):
    """A file that lost a tensor (cut short by hand, or written by another version) would leave that tensor at its
    random init and load without a word; it is a UserError naming the tensor."""
    from safetensors.torch import load_file, save_file

    model, _ = trained("lopa")
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors["col_head.out_proj.bias"]
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=r"missing tensor 'col_head.out_proj.bias' \(1 in all\)"):
        load_tuned_model(tmp_path)
