"""Foundation models of families the paper did not use, registered as docs/EXTENDING.md says, through the real paths.

Tiny random-init miniatures of Qwen2(.5)-Coder (``qwen2``), StarCoder2 (``starcoder2``, with the real models'
4,096-token sliding window) and StarCoder/SantaCoder (``gpt_bigcode``: learned absolute positions, multi-query
attention, a fused ``c_attn``), each put into the registry for the module only (``FOUNDATION_MODELS``), then trained
(pt, lora, lopa, fft: 2 steps, packing on, the selective loss) and decoded (both loops, fast decoding) by the
scripts' own ``main``.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import generate_preds
from custom_peft import build_model, load_tuned_model, trainable_state_dict
from custom_peft.packing import packing_refusal
from tests.test_generation import _perturb
from tests.test_methods import batch_of
from tests.test_packing import PROMPTS, TARGETS, _loss_and_grads
from tests.test_training_runs import run_inprocess
from utils.fast_paths import decoder_layers
from utils.registry import FOUNDATION_MODELS, FoundationModelSpec
from utils.train_logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

_TINY = dict(vocab_size=2048, max_position_embeddings=1024)
NEW_FAMILIES = {
    "tiny-qwen2": FoundationModelSpec("tiny-qwen2", None, ("q_proj", "k_proj", "v_proj"), 64, dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **_TINY), tiny=True),
    "tiny-starcoder2": FoundationModelSpec("tiny-starcoder2", None, ("q_proj", "k_proj", "v_proj"), 64, dict(
        model_type="starcoder2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4096, residual_dropout=0.0, embedding_dropout=0.0, **_TINY),
        tiny=True),
    "tiny-gpt-bigcode": FoundationModelSpec("tiny-gpt-bigcode", None, ("c_attn",), 64, dict(
        model_type="gpt_bigcode", n_embd=64, n_layer=2, n_head=4, n_positions=1024, multi_query=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=2048), tiny=True),
}
# Bloom: ALiBi, positions from the attention mask (packing_refusal); only for the refusal below.
TINY_BLOOM = FoundationModelSpec("tiny-bloom", None, ("query_key_value",), 64, dict(
    model_type="bloom", hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
    vocab_size=2048, initializer_range=0.3), tiny=True)
# The same with sharper random weights (std 0.3, not 0.02): at 0.02 every position's output is nearly uniform, and a
# packed row whose examples saw each other moved the loss by only ~3e-5.
SHARP = {f"{name}-sharp": dataclasses.replace(spec, name=f"{name}-sharp", arch={**spec.arch, "initializer_range": 0.3})
         for name, spec in NEW_FAMILIES.items()}
FAMILIES = list(NEW_FAMILIES)
METHODS = ("pt", "lora", "lopa", "fft")


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The registration docs/EXTENDING.md shows, undone after the module."""
    with pytest.MonkeyPatch.context() as mp:
        for name, spec in {**NEW_FAMILIES, **SHARP, "tiny-bloom": TINY_BLOOM}.items():
            mp.setitem(FOUNDATION_MODELS, name, spec)
        yield


def _train_argv(method: str, model_type: str, data: str, log_dir) -> tuple[str, list[str]]:
    argv = ["--task_name", "mbpp", "--model_type", model_type, "--data_path", data, "--limit_train_examples", "4",
            "--per_gpu_train_batch_size", "2", "--max_train_steps", "2", "--max_length", "128",
            "--log_dir", str(log_dir)]
    if method == "fft":
        return "fft", argv + ["--lr", "1e-3"]
    argv = ["--peft_method", method, "--lr", "0.05"] + argv
    if method != "lora":
        argv += ["--num_virtual_tokens", "4"]
    if method == "lopa":
        argv += ["--enc_model_type", "tiny-roberta"]
    return "peft", argv


@pytest.fixture(scope="module")
def trained(registered, data_paths, tmp_path_factory) -> dict:
    """(model_type, method) -> log_dir of a 2-step run of the script (packing and the selective loss at their
    defaults, which are on)."""
    runs = {}
    for model_type in FAMILIES:
        for method in METHODS:
            log_dir = tmp_path_factory.mktemp(f"{model_type}-{method}")
            script, argv = _train_argv(method, model_type, data_paths["mbpp"], log_dir / "run")
            run_inprocess(script, argv)
            runs[model_type, method] = log_dir / "run"
    return runs


def _trained_tensors(method: str, model_type: str, final=None) -> dict[str, torch.Tensor]:
    """The tensors ``method`` trains: as built (the trainer's default seed) or as saved in ``final``."""
    if method == "fft":
        lm = (build_model("none", model_type)[0].lm if final is None
              else AutoModelForCausalLM.from_pretrained(final))
        return {n: p.detach() for n, p in lm.named_parameters()}
    model = (build_model(method, model_type, num_virtual_tokens=4, enc_model_type="tiny-roberta")[0] if final is None
             else load_tuned_model(final)[0])
    return {n: t.detach() for n, t in trainable_state_dict(model).items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_method_trains_a_new_family_through_the_script(model_type, method, trained):
    log_dir = trained[model_type, method]
    config = json.loads((log_dir / "config.json").read_text())
    assert config["runtime"]["packing"] is True and config["train"]["selective_logits"] is True
    losses = [r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(x) and 6.0 < x < 9.0 for x in losses), losses
    before, after = _trained_tensors(method, model_type), _trained_tensors(method, model_type, log_dir / "final")
    assert before.keys() == after.keys() and before
    assert all(torch.isfinite(t).all() for t in after.values())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "two steps left every trained tensor as it was"
    if method == "lora":  # the adapter wraps exactly the spec's attention projections, in every layer
        spec = NEW_FAMILIES[model_type]
        lm = load_tuned_model(log_dir / "final")[0].lm
        wrapped = {n for n, m in lm.named_modules() if hasattr(m, "lora_A")}
        assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(spec.lora_targets)
        assert len(wrapped) == len(spec.lora_targets) * len(decoder_layers(lm))


@pytest.mark.parametrize("method", ["none", "lopa"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_rows_give_the_padded_loss_and_gradients_for_a_new_family(model_type, method, monkeypatch):
    """gpt_bigcode's learned absolute positions restart with the position ids as rotary ones do. The control: the
    same packed row under one causal mask over the whole row (its examples see each other) gives another loss."""
    import custom_peft.tuned_model as tuned_model

    model, tok = build_model(method, f"{model_type}-sharp", num_virtual_tokens=4, lp_rank=2,
                             enc_model_type="tiny-roberta", seed=11)
    _perturb(model, 11, 0.3)
    model.eval()
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    assert packing_refusal(model.lm) is None
    model._attention_width = 1e9  # matmuls dominate: the padded batch packs into one row
    shapes = []
    hook = model.lm.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["inputs_embeds"].shape[0]
                                                   if kwargs.get("inputs_embeds") is not None else None),
        with_kwargs=True)
    try:
        padded_loss, padded_grads = _loss_and_grads(model, batch, packing=False)
        packed_loss, packed_grads = _loss_and_grads(model, batch, packing=True)
    finally:
        hook.remove()
    assert shapes[-1] == 1  # one packed row
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5, (packed_loss, padded_loss)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(tuned_model, "block_causal_mask", lambda positions: torch.ones(
        positions.shape[-1], positions.shape[-1], dtype=torch.bool).tril()[None, None])
    assert abs(_loss_and_grads(model, batch, packing=True)[0].item() - padded_loss.item()) > 1e-2


@pytest.mark.parametrize("task_name", ["mbpp", "cruxeval_output_prediction"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_preds_decodes_a_new_family_in_both_loops(model_type, task_name, trained, data_paths, tmp_path):
    data = data_paths["mbpp" if task_name == "mbpp" else "cruxeval"]
    raw = "mbxp_raw.jsonl" if task_name == "mbpp" else "output_raw.json"
    got = {}
    for loop in ("own", "hf"):
        log_dir = tmp_path / loop
        generate_preds.main(["--task_name", task_name, "--model_type", model_type, "--data_path", data,
                             "--load_adapter_from", str(trained[model_type, "lopa"] / "final"), "--limit", "2",
                             "--max_new_tokens", "4", "--decode_loop", loop, "--fast_decoding", "on",
                             "--log_dir", str(log_dir), "--no_progress"])
        text = (log_dir / raw).read_text()
        records = ([json.loads(line) for line in text.splitlines()] if task_name == "mbpp"
                   else list(json.loads(text).values()))
        assert len(records) == 2
        got[loop] = text
    assert got["own"] == got["hf"]  # greedy: the own loop gives generate's predictions


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_new_familys_full_fine_tuning_generates_from_its_final_dir(model_type, trained, data_paths, tmp_path):
    generate_preds.main(["--task_name", "mbpp", "--model_type", model_type, "--data_path", data_paths["mbpp"],
                         "--model_path", str(trained[model_type, "fft"] / "final"), "--limit", "2",
                         "--max_new_tokens", "4", "--log_dir", str(tmp_path / "gen"), "--no_progress"])
    config = json.loads((tmp_path / "gen" / "generate_preds_config.json").read_text())
    assert config["peft_method"] == "fft"  # the trained weights, not the untuned base
    assert len((tmp_path / "gen" / "mbxp_raw.jsonl").read_text().splitlines()) == 2


def test_decoder_layers_are_found_one_level_down():
    """OPT keeps its blocks in ``model.decoder.layers``, not directly under the body: ``compile_layers``
    (``--compile``) raised 'could not find the decoder layers'."""
    config = AutoConfig.for_model("opt", vocab_size=256, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                                  num_hidden_layers=2, num_attention_heads=4)
    lm = AutoModelForCausalLM.from_config(config)
    assert decoder_layers(lm) is lm.model.decoder.layers


def test_a_model_whose_positions_come_from_the_mask_trains_unpacked(data_paths, tmp_path):
    """Bloom's ALiBi reads positions from the attention mask, not position ids: packed, its examples saw each other
    (with these weights the packed loss below was 9.758 against 9.121 padded). Packing is refused, the forward keeps
    padded rows, and the trainer says so."""
    model, tok = build_model("lopa", "tiny-bloom", num_virtual_tokens=4, enc_model_type="tiny-roberta", seed=11)
    _perturb(model, 11, 0.3)
    model.eval()
    assert "takes no position_ids" in packing_refusal(model.lm)
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    padded_loss, _ = _loss_and_grads(model, batch, packing=False)
    packed_loss, _ = _loss_and_grads(model, batch, packing=True)
    assert packed_loss.item() == padded_loss.item()
    log_dir = tmp_path / "run"
    run_inprocess("peft", _train_argv("pt", "tiny-bloom", data_paths["mbpp"], log_dir)[1])
    assert json.loads((log_dir / "config.json").read_text())["runtime"]["packing"] is False
    assert "--packing is not used: BloomModel.forward takes no position_ids" in (log_dir / "train.log").read_text()


def test_a_model_that_cannot_pack_says_nothing_of_packing_when_it_is_off(data_paths, tmp_path):
    """The refusal is news only to a run that asked for packing: --packing False on Bloom logs no warning."""
    log_dir = tmp_path / "run"
    run_inprocess("peft", _train_argv("pt", "tiny-bloom", data_paths["mbpp"], log_dir)[1] + ["--packing", "False"])
    assert json.loads((log_dir / "config.json").read_text())["runtime"]["packing"] is False
    assert "--packing" not in (log_dir / "train.log").read_text()
