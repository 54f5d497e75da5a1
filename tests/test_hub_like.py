"""The load / encode / generate paths on local directories shaped like the real hub checkpoints (tests/hub_like.py):
config keys the tiny registry models never have (no pad_token_id, torch_dtype bfloat16, linear RoPE scaling,
sliding_window, auto_map), generation configs that sample, and tokenizers whose BOS comes from tokenizer.json."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

import tune_foundation_model
from custom_peft import build_model
from tests import hub_like
from utils.batching import encode_example, encoder_ids
from utils.generation import GenConfig, _eos_ids
from utils.encoders import load_encoder_tokenizer
from utils.models import load_foundation_model
from utils.tasks import get_task
from utils.train_setup import reset_accelerate_state

PROMPT = '\n\ndef add(a, b):\n    """\n    >>> add(1, 2)\n    3\n    """\n'
RECORD = {"task_id": "MBPP/1", "prompt": PROMPT, "canonical_solution": "    return a + b", "entry_point": "add"}
ADDS_BOS = {"phi-2": False, "phi-3": True, "deepseek-coder-1.3b-base": True, "deepseek-coder-7b-base": True,
            "Meta-Llama-3-8B": True}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    dirs = {name: str(build(root / name)) for name, build in hub_like.FOUNDATION_BUILDERS.items()}
    dirs["codebert-base"] = str(hub_like.codebert_base(root / "codebert-base"))
    return dirs


@pytest.mark.parametrize("model_type", list(hub_like.FOUNDATION_BUILDERS))
def test_hub_like_checkpoint_loads_in_the_asked_dtype_and_encodes_as_its_tokenizer_json(hub, model_type, one_thread):
    model, tok = load_foundation_model(model_type, model_path=hub[model_type], dtype="fp32")
    assert model.dtype == torch.float32  # config.json says bfloat16/float16; --model_dtype wins
    raw = Tokenizer.from_file(f"{hub[model_type]}/tokenizer.json").encode(PROMPT).ids
    example = encode_example(get_task("mbpp"), RECORD, tok)
    answer = tok("    return a + b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example["input_ids"] == raw + answer and example["labels"][-len(answer):] == answer
    assert (example["input_ids"][0] == tok.bos_token_id) == ADDS_BOS[model_type]  # spec §4.1: the BOS-adders' one BOS
    assert example["input_ids"].count(tok.bos_token_id) == 1  # never a second BOS (phi-2's one is its EOS)
    assert tok.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    if model_type == "deepseek-coder-1.3b-base":  # the hub's {"type": "linear", "factor": 4.0} survives the rename
        assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0
    if model_type == "phi-3":  # generation stops on every EOS the hub's generation config lists
        assert len(_eos_ids(build_model("none", "phi-3", model_path=hub["phi-3"])[0], tok)) == 3
    if model_type == "deepseek-coder-7b-base":  # targets end in the tokenizer's <|EOT|>; generation stops on it too
        configured = model.generation_config.eos_token_id
        assert tok.eos_token == "<|EOT|>" and configured == tok.pad_token_id != tok.eos_token_id
        assert _eos_ids(build_model("none", model_type, model_path=hub[model_type])[0], tok) == sorted(
            [configured, tok.eos_token_id])


def test_greedy_decoding_ignores_the_hub_generation_configs_sampling(hub, one_thread):
    """Meta-Llama-3-8B's generation_config.json samples (T 0.6, top-p 0.9): our greedy default must not."""
    model, tok = build_model("none", "Meta-Llama-3-8B", model_path=hub["Meta-Llama-3-8B"])
    assert model.lm.generation_config.do_sample is True
    batch = tok(["def f(x):\n    return", "import os\n"], return_tensors="pt", padding=True, padding_side="left")
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(model.generate(batch["input_ids"], batch["attention_mask"], **GenConfig().hf_kwargs(),
                                   max_new_tokens=8, pad_token_id=tok.pad_token_id))
    ids, mask, argmax = batch["input_ids"], batch["attention_mask"], []
    with torch.no_grad():
        for _ in range(8):
            logits = model.lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
            argmax.append(logits[:, -1].argmax(-1, keepdim=True))
            ids, mask = torch.cat([ids, argmax[-1]], 1), torch.cat([mask, torch.ones_like(argmax[-1])], 1)
    assert runs[0].tolist() == runs[1].tolist() == torch.cat(argmax, 1).tolist()


def test_lopa_trains_and_generates_on_hub_like_llama3_and_codebert(hub, tmp_path, data_paths, one_thread):
    enc_tok = load_encoder_tokenizer("codebert-base", hub["codebert-base"])
    ids = encoder_ids("def f(): pass", enc_tok)
    assert ids[0] == enc_tok.cls_token_id and ids[-1] == enc_tok.sep_token_id and len(ids) > 2
    import generate_preds

    common = ["--task_name", "mbpp", "--model_type", "Meta-Llama-3-8B", "--model_path", hub["Meta-Llama-3-8B"],
              "--data_path", data_paths["mbpp"], "--peft_method", "lopa", "--enc_model_type", "codebert-base",
              "--enc_model_path", hub["codebert-base"]]
    reset_accelerate_state()
    try:
        tune_foundation_model.main(common + ["--max_train_steps", "2", "--limit_train_examples", "4",
                                             "--log_dir", str(tmp_path / "train")])
        reset_accelerate_state()
        assert generate_preds.main(common + ["--load_adapter_from", str(tmp_path / "train" / "final"), "--limit",
                                             "2", "--max_new_tokens", "4", "--log_dir", str(tmp_path / "preds"),
                                             "--no_progress"]) in (0, None)
    finally:
        reset_accelerate_state()
    assert (tmp_path / "preds" / "mbxp_solutions.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("model_type, bos", [("phi-3", "<s>"), ("phi-2", "<|endoftext|>")])
def test_the_tokenizer_prepends_a_bos_exactly_when_the_original_runs_had_one(tmp_path, model_type, bos, caplog):
    """transformers 5 takes BOS from tokenizer.json alone; hub files that disagree with the original's runs (spec
    §4.1: Phi-3 prepends one, phi-2 not) are overridden, with a warning. Here each tokenizer.json says otherwise."""
    import json
    import logging

    from utils.models import load_tokenizer
    from utils.train_logging import LOGGER_NAME

    path = hub_like.FOUNDATION_BUILDERS[model_type](tmp_path / model_type)
    files = json.loads((path / "tokenizer.json").read_text())
    bos_id = files["added_tokens"][[t["content"] for t in files["added_tokens"]].index(bos)]["id"]
    files["post_processor"] = (None if model_type == "phi-3" else
                               {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}})
    (path / "tokenizer.json").write_text(json.dumps(files))
    raw = Tokenizer.from_file(str(path / "tokenizer.json")).encode("x = 1").ids
    assert (raw[0] == bos_id) != (model_type == "phi-3")  # the files disagree with the original runs
    logger = logging.getLogger(LOGGER_NAME)  # training sets propagate=False on it: listen to it directly
    logger.addHandler(caplog.handler)
    try:
        tok = load_tokenizer(model_type, str(path))
        ids = tok("x = 1")["input_ids"]
        assert ids == ([bos_id] + raw if model_type == "phi-3" else raw[1:])
        assert f"{model_type}'s tokenizer {'prepended' if model_type == 'phi-3' else 'did not prepend'}" in caplog.text
        tok.save_pretrained(tmp_path / "copy")  # an FFT final/ keeps the corrected tokenizer
        caplog.clear()
        assert load_tokenizer(model_type, str(tmp_path / "copy"))("x = 1")["input_ids"] == ids and not caplog.text
    finally:
        logger.removeHandler(caplog.handler)


def test_an_eos_the_tokenizer_files_append_survives_the_bos_correction(tmp_path):
    """Rebuilding the post-processor for the BOS must not drop an EOS that tokenizer.json appends."""
    import json

    from utils.models import load_tokenizer

    path = hub_like.phi3(tmp_path / "phi-3")
    files = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in files["added_tokens"]}
    files["post_processor"] = {"type": "TemplateProcessing",
                               "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                          {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [ids["<|endoftext|>"]],
                                                                    "tokens": ["<|endoftext|>"]}}}
    (path / "tokenizer.json").write_text(json.dumps(files))
    raw = Tokenizer.from_file(str(path / "tokenizer.json")).encode("x = 1").ids
    assert raw[-1] == ids["<|endoftext|>"] and raw[0] != ids["<s>"]
    assert load_tokenizer("phi-3", str(path))("x = 1")["input_ids"] == [ids["<s>"]] + raw


def test_a_tokenizer_that_splits_otherwise_than_its_tokenizer_json_is_warned_about(hub, tmp_path, caplog):
    """transformers 5 can rebuild a tokenizer from its class instead of its tokenizer.json (5.17 does for
    DeepSeek-Coder's files). Here phi-2's byte-level tokenizer.json splits without GPT-2's regex, and its
    tokenizer_config declares a GPT2Tokenizer, whose pipeline has it."""
    import json
    import logging

    from utils.models import load_tokenizer
    from utils.train_logging import LOGGER_NAME

    path = hub_like.phi2(tmp_path / "phi-2")
    files = json.loads((path / "tokenizer.json").read_text())
    files["pre_tokenizer"]["use_regex"] = False
    (path / "tokenizer.json").write_text(json.dumps(files))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "GPT2Tokenizer"}))
    logger = logging.getLogger(LOGGER_NAME)  # training sets propagate=False on it: listen to it directly
    logger.addHandler(caplog.handler)
    try:
        for model_type in hub_like.FOUNDATION_BUILDERS:  # the hub-shaped files agree with their tokenizer.json
            load_tokenizer(model_type, hub[model_type])
        assert "tokenizes otherwise" not in caplog.text
        load_tokenizer("phi-2", str(path))
        assert f"{path}: transformers" in caplog.text and "tokenizes otherwise than this checkpoint's" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("model_type", list(hub_like.FOUNDATION_BUILDERS))
def test_a_full_checkpoint_loads_into_the_bare_architecture_as_into_the_loaded_base(hub, model_type, tmp_path,
                                                                                   monkeypatch, one_thread):
    """generate_preds' FFT state files and shards supply every weight: the base's are not read (for a 7-8B model,
    15 GB read, or downloaded on a machine without them, then overwritten). Built from config.json alone, the model
    must compute what the loaded one does: buffers such as rotary frequencies (deepseek's linear scaling, Phi-3's
    window) come from the config, and the generation config is the hub's."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from utils.generation import load_fft_weights

    loaded, tok = load_foundation_model(model_type, model_path=hub[model_type], dtype="fp32")
    with torch.random.fork_rng():  # weights unlike the hub copy's, so that a base read by mistake shows
        torch.manual_seed(1)
        trained = {k: v + 0.01 * torch.randn_like(v) for k, v in loaded.state_dict().items()}
    save_file({f"backbone.{k}": v.contiguous() for k, v in trained.items()}, str(tmp_path / "trainable.safetensors"))
    loaded.load_state_dict(trained)

    def unread(*args, **kwargs):
        raise AssertionError("the base's weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", unread)
    bare, _ = load_foundation_model(model_type, model_path=hub[model_type], dtype="fp32", empty_weights=True)
    load_fft_weights(bare, state_dict_file=str(tmp_path / "trainable.safetensors"))
    assert bare.config.to_dict() == loaded.config.to_dict()
    assert bare.generation_config.to_dict() == loaded.generation_config.to_dict()
    batch = tok([PROMPT, "import os\n"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        assert torch.equal(bare.eval()(**batch).logits, loaded.eval()(**batch).logits)
