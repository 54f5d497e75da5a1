"""The fast paths give the plain path's results (on the CPU; the GPU figures are in BENCHMARKS.md)."""
import pytest
import torch

from custom_peft import build_model
from utils.batching import Collator
from utils.fast_paths import compile_layers, decoder_layers, make_adamw, static_cache_kwargs
from utils.models import tiny_tokenizer

ENC_TOK = tiny_tokenizer("roberta")
PROMPTS = ["def add(a, b):\n    return a + b", "x = [i * i for i in range(10)]\nprint(x)", "import os"]


def _batch(tok, side="right", multiple=None):
    rows = [{"input_ids": tok(p)["input_ids"], "labels": tok(p)["input_ids"], "task_id": str(i),
             "enc_input_ids": ENC_TOK(p)["input_ids"]} for i, p in enumerate(PROMPTS)]
    batch = Collator(tok.pad_token_id, ENC_TOK.pad_token_id, padding_side=side, pad_to_multiple_of=multiple)(rows)
    batch.pop("task_ids")
    return batch


def _train_losses(method, model_type, compiled: bool, steps=3):
    model, tok = build_model(method, model_type, enc_model_type="tiny-roberta", num_virtual_tokens=4, seed=2,
                             lora_dropout=0.0)
    for module in model.modules():  # dropout would draw from the RNG differently once compiled
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if compiled:
        assert compile_layers(model.lm, backend="aot_eager") == model.lm.config.num_hidden_layers
    opt = make_adamw(model.parameters(), lr=1e-2)
    batch, losses = _batch(tok), []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method, model_type", [("lopa", "tiny-llama"), ("lora", "tiny-phi-2")])
def test_compiled_layers_train_like_eager(method, model_type):
    eager = _train_losses(method, model_type, compiled=False)
    compiled = _train_losses(method, model_type, compiled=True)
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, abs=1e-5)


def test_decoder_layers_found_for_every_family():
    for model_type in ("tiny-phi-2", "tiny-phi-3", "tiny-llama", "tiny-codegen"):
        model, _ = build_model("none", model_type, seed=0)
        assert len(decoder_layers(model.lm)) == model.lm.config.num_hidden_layers


def test_make_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = make_adamw(a.parameters(), lr=0.1, weight_decay=0.05)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1, weight_decay=0.05)
    assert opt_a.defaults["fused"] is False  # CPU parameters
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            m(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["none", "pt", "lopa"])
@pytest.mark.parametrize("model_type", ["tiny-phi-2", "tiny-llama", "tiny-phi-3", "tiny-codegen"])
def test_static_cache_and_bucketed_padding_generate_the_same_tokens(method, model_type):
    model, tok = build_model(method, model_type, enc_model_type="tiny-roberta", num_virtual_tokens=4, seed=5)
    plain = model.generate(**_batch(tok, "left"), max_new_tokens=8, do_sample=False)
    fast = model.generate(**_batch(tok, "left", multiple=16), max_new_tokens=8, do_sample=False,
                          **static_cache_kwargs())
    assert plain.shape == (3, 8)
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("method", ["none", "pt"])
def test_a_sliding_window_model_compiles_its_decoding_step_once(method, monkeypatch):
    """Phi-3's 2,047-token window: transformers' own static cache made its compiled step compile again at every step
    (8 graphs for 11 steps here, then eager); the full-attention cache that covers the sequence compiles once per
    shape, in generate's fast path and in the own loop, and gives the plain path's tokens."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    from utils.decode_loop import GreedyDecoder
    from utils.fast_paths import full_attention_config
    from utils.registry import get_model_spec
    from utils.stopping import StopOnText

    monkeypatch.setitem(get_model_spec("tiny-phi-3").arch, "sliding_window", 2047)
    model, tok = build_model(method, "tiny-phi-3", num_virtual_tokens=4, seed=5)
    model.lm.generation_config.eos_token_id = None
    plain = model.generate(**_batch(tok, "left"), max_new_tokens=12, do_sample=False)
    batch = _batch(tok, "left", multiple=16)
    compile_config = CompileConfig(backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    torch.compiler.reset()
    counters.clear()
    for _ in range(2):  # the second call reuses the first one's cache and compiled step
        fast = model.generate(**batch, max_new_tokens=12, do_sample=False, cache_implementation="static",
                              compile_config=compile_config)
        assert torch.equal(plain, fast)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    decoder = GreedyDecoder(compile_kwargs={"backend": "eager", "fullgraph": True, "dynamic": False})
    own = model.decode_greedy(decoder, batch["input_ids"], batch["attention_mask"], max_new_tokens=12,
                              criterion=StopOnText(tok, (), [12] * 3))
    assert torch.equal(plain, own) and counters["stats"]["unique_graphs"] == 2
    torch.compiler.reset()
    config = model.lm.config
    assert full_attention_config(config, 2047).sliding_window is None and config.sliding_window == 2047
    assert full_attention_config(config, 2048) is config  # longer than the window: the window matters


def test_a_sliding_window_the_sequence_outgrows_keeps_generate_eager(monkeypatch):
    """Past the window (16 here), transformers' sliding-window cache layers count positions in a Python int and a
    compiled step would compile again at every step (8 graphs, then torch's limit turns it eager): generate's
    static cache then runs eager from the start, with the plain path's tokens."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    from utils.registry import get_model_spec

    monkeypatch.setitem(get_model_spec("tiny-phi-3").arch, "sliding_window", 16)
    model, tok = build_model("pt", "tiny-phi-3", num_virtual_tokens=4, seed=5)
    model.lm.generation_config.eos_token_id = None
    plain = model.generate(**_batch(tok, "left"), max_new_tokens=12, do_sample=False)
    compile_config = CompileConfig(backend="eager", dynamic=False)
    compile_config._compile_all_devices = True
    torch.compiler.reset()
    counters.clear()
    fast = model.generate(**_batch(tok, "left", multiple=16), max_new_tokens=12, do_sample=False,
                          cache_implementation="static", compile_config=compile_config)
    assert torch.equal(plain, fast)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    torch.compiler.reset()


def test_the_cache_keyword_follows_the_installed_transformers():
    """transformers 5.24 (pinned) takes ``cache``; 5.17 (the GPU machine's image) ``past_key_values`` and would swallow
    ``cache=`` into its ``**kwargs``, decoding without the cache (seen: other tokens). Checked under both on the CPU."""
    import inspect

    from utils.fast_paths import cache_argument

    model, _ = build_model("none", "tiny-llama", seed=0)
    name = cache_argument(model.lm)
    assert name in inspect.signature(model.lm.forward).parameters

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return input_ids

    assert cache_argument(Older()) == "past_key_values"


def test_generate_preds_fast_decoding_writes_the_same_files(tmp_path, data_paths):
    import generate_preds

    files = {}
    for mode in ("off", "on"):
        log_dir = tmp_path / mode
        generate_preds.main(["--task_name", "mbpp", "--model_type", "tiny-llama", "--peft_method", "none",
                             "--data_path", data_paths["mbpp"], "--limit", "5", "--batch_size", "3",
                             "--max_new_tokens", "12", "--no_progress", "--fast_decoding", mode,
                             "--log_dir", str(log_dir)])
        files[mode] = (log_dir / "mbxp_raw.jsonl").read_text()
    assert files["on"] == files["off"] and files["on"].count("\n") == 5


def test_compiled_encoder_layers_pool_like_eager():
    """The trainer's --compile_encoder: every encoder family's layers are found, and compiled they give eager's
    instance embeddings (eval mode: dropout draws differently once compiled)."""
    from tests.test_codesage import CONFIG as CODESAGE_CONFIG
    from utils.codesage import CodeSageEncoder
    from utils.fast_paths import compile_encoder_layers, encoder_layers
    from utils.encoders import PooledEncoder, load_encoder

    torch.manual_seed(0)
    encoders = {"tiny-roberta": load_encoder("tiny-roberta")[0],
                "codesage": PooledEncoder(CodeSageEncoder(CODESAGE_CONFIG), "pooler_l2")}
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for name, encoder in encoders.items():
        n_layers = encoder.backbone.config.num_hidden_layers
        assert len(encoder_layers(encoder.backbone)) == n_layers >= 2, name
        eager = encoder.eval()(ids, mask)
        assert compile_encoder_layers(encoder.backbone, backend="aot_eager") == n_layers
        torch.testing.assert_close(encoder(ids, mask), eager, rtol=1e-5, atol=1e-6)
        assert all(getattr(layer, "_compiled_call_impl", None) is not None
                   for layer in encoder_layers(encoder.backbone)), name


@pytest.mark.parametrize("method, backend", [("lopa", "inductor"), ("idpg", "aot_eager")])
def test_compiled_prompt_heads_give_eager_prompts_and_gradients(method, backend):
    """The trainer's --compile also compiles LOPA's / IDPG's heads and gate (LOPA through inductor, as on a GPU):
    the prompts and head gradients of eager, for two batch sizes (eval mode: dropout draws differently once
    compiled)."""
    from torch._dynamo.utils import counters

    from utils.fast_paths import compile_prompt_heads

    model = build_model(method, "tiny-llama", enc_model_type="tiny-roberta", lp_rank=2, seed=0)[0].eval()
    prompt = model.prompt
    params = [p for p in prompt.parameters() if p.requires_grad]
    assert compile_prompt_heads(model.backbone) is False  # nothing to compile without heads
    outputs = {}
    torch.compiler.reset()
    counters.clear()
    for name in ("eager", "compiled"):
        if name == "compiled":
            assert compile_prompt_heads(prompt, backend=backend) and prompt.heads_compiled
        for rows in (3, 5):
            ids = torch.randint(5, 40, (rows, 7), generator=torch.Generator().manual_seed(rows))
            z = prompt(ids, torch.ones_like(ids))
            weights = torch.linspace(-1, 1, z.numel()).view_as(z)
            outputs[name, rows] = (z.detach(), torch.autograd.grad((z * weights).sum(), params))
        if name == "eager":
            assert counters["stats"]["unique_graphs"] == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the heads ran compiled
    torch.compiler.reset()
    for rows in (3, 5):
        eager, compiled = outputs["eager", rows], outputs["compiled", rows]
        assert eager[0].shape == (rows, model.num_virtual_tokens, model.lm.config.hidden_size)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(compiled[1], eager[1]):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_full_attention_static_cache_holds_every_return_sequence_and_new_token(monkeypatch):
    """Phi-3 (window 2,047 here) decodes into the project's own static cache, kept between calls: it must hold
    B·num_return_sequences rows and prompt + m + new positions. A sampled call (3 sequences a row), then a greedy
    one on the same batch (a cache sized by rows alone was reused, 9 rows for 3: an error), then one past the first
    64-position bucket, give the plain path's tokens."""
    from utils.registry import get_model_spec

    monkeypatch.setitem(get_model_spec("tiny-phi-3").arch, "sliding_window", 2047)
    model, tok = build_model("pt", "tiny-phi-3", num_virtual_tokens=4, seed=5)
    model.lm.generation_config.eos_token_id = None
    batch = _batch(tok, "left", multiple=16)
    assert batch["input_ids"].shape[1] + 4 <= 64 < batch["input_ids"].shape[1] + 4 + 50
    for kwargs in (dict(num_return_sequences=3, do_sample=True, top_k=0, temperature=2.0, max_new_tokens=6),
                   dict(do_sample=False, max_new_tokens=6), dict(do_sample=False, max_new_tokens=50)):
        torch.manual_seed(0)
        plain = model.generate(**batch, **kwargs)
        torch.manual_seed(0)
        fast = model.generate(**batch, cache_implementation="static", disable_compile=True, **kwargs)
        assert torch.equal(plain, fast) and plain.shape == (3 * kwargs.get("num_return_sequences", 1),
                                                             kwargs["max_new_tokens"])
    assert model._static_caches.shapes == {(9, 64), (3, 64), (3, 128)}
