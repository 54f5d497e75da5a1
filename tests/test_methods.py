"""The six methods on tiny models of every family: counts, equivalences, gradients, cache-correct generation."""
from __future__ import annotations

import functools

import pytest
import torch

from custom_peft import (build_model, count_trainable, expected_trainable_count, idpg_trainable_count,
                         lopa_trainable_count, pt_trainable_count, trainable_state_dict)
from utils.batching import IGNORE_INDEX, Collator
from utils.encoders import load_encoder_tokenizer
from utils.models import TINY_MODEL_TYPES, enable_activation_checkpointing

METHODS = ("none", "fft", "lora", "pt", "idpg", "lopa")
M, R = 4, 2  # virtual tokens and LOPA rank of the tiny builds
ENC_DIM = 48  # tiny-roberta's width (and head width)
PROMPTS = ["def add(a, b):\n    return", "x = [i * i for i in range(10)]\nprint(x", "import os"]
NEW_TOKENS = 7


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def built(method: str, model_type: str, enc: str = "tiny-roberta"):
    """A built model in eval mode, shared by the tests that only read it. Its adapter tensors are moved off their
    init (LoRA's B starts at zero, LOPA's gate near 0.5), so every method visibly changes the base model."""
    model, tok = build_model(method, model_type, num_virtual_tokens=M, lp_rank=R, enc_model_type=enc, seed=11)
    if method != "fft":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval(), tok


def batch_of(tok, prompts, enc: str = "tiny-roberta", side: str = "left", targets=None) -> dict:
    """A collated batch as the project's Collator makes it (labels on ``targets`` when given)."""
    enc_tok = load_encoder_tokenizer(enc)
    examples = []
    for i, text in enumerate(prompts):
        ids = tok(text)["input_ids"]
        example = {"task_id": str(i), "input_ids": ids,
                   "enc_input_ids": enc_tok(text)["input_ids"]}
        if targets is not None:
            answer = tok(targets[i], add_special_tokens=False)["input_ids"]
            example.update(input_ids=ids + answer, labels=[IGNORE_INDEX] * len(ids) + answer)
        examples.append(example)
    batch = Collator(tok.pad_token_id, enc_tok.pad_token_id, padding_side=side)(examples)
    batch.pop("task_ids")
    return batch


def row(batch: dict, i: int) -> dict:
    """Row i of a left-padded batch, unpadded (both the LM and the encoder inputs)."""
    keep, enc_keep = batch["attention_mask"][i].bool(), batch["enc_attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i][keep][None], "attention_mask": batch["attention_mask"][i][keep][None],
            "enc_input_ids": batch["enc_input_ids"][i][enc_keep][None],
            "enc_attention_mask": batch["enc_attention_mask"][i][enc_keep][None]}


def full_logits_forward(model, batch):
    """``model(**batch)`` through the plain path (logits at every position), selective logits restored after."""
    model.selective_logits = False
    try:
        return model(**batch)
    finally:
        model.selective_logits = True


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


# ------------------------------------------------------------------------------------------------ counts
def millions(n: int) -> float:
    return round(n / 1e6, 2)


def test_paper_parameter_counts_from_the_registry_without_a_download():
    """spec §10.4: the numbers the paper reports, from registry widths only (no model is built or fetched)."""
    for model_type, lopa in (("phi-2", (4.76, 7.39, 12.66)), ("deepseek-coder-1.3b-base", (4.23, 6.34, 10.56))):
        got = [millions(expected_trainable_count("lopa", model_type, num_virtual_tokens=10, lp_rank=r,
                                                 enc_model_type="codesage-small")) for r in (1, 2, 4)]
        assert got == list(lopa), model_type
    assert [millions(lopa_trainable_count(2048, 768, 768, 10, r)) for r in (1, 2, 4)] == [2.78, 4.37, 7.53]
    assert expected_trainable_count("pt", "phi-2", num_virtual_tokens=10) == 25_600
    assert expected_trainable_count("pt", "deepseek-coder-1.3b-base", num_virtual_tokens=10) == 20_480
    idpg = [millions(expected_trainable_count("idpg", "deepseek-coder-1.3b-base", num_virtual_tokens=m,
                                              enc_model_type="codebert-base")) for m in (5, 10, 25, 50, 100)]
    assert idpg == [8.47, 16.34, 39.96, 79.34, 158.08]
    # The m sweep's end points: PT 0.01-0.20, LOPA (CodeBERT, r=1) 2.77-3.04.
    assert [millions(expected_trainable_count("pt", "deepseek-coder-1.3b-base", num_virtual_tokens=m))
            for m in (5, 100)] == [0.01, 0.20]
    assert [millions(lopa_trainable_count(2048, 768, 768, m, 1)) for m in (5, 100)] == [2.77, 3.04]
    # GLUE (RoBERTa-large FM and encoder, d = H = 1024, head width h = 256): the head_dim the formulas take.
    assert [millions(lopa_trainable_count(1024, 1024, 256, 10, r)) for r in (1, 2, 4)] == [0.80, 1.07, 1.60]
    assert [millions(lopa_trainable_count(1024, 1024, 256, m, 4)) for m in (5, 100)] == [1.59, 1.78]
    assert millions(idpg_trainable_count(1024, 1024, 256, 10)) == 2.89
    # LoRA r=16 on q,k,v: r·(in+out) per adapted Linear, counted on the meta device.
    assert expected_trainable_count("lora", "phi-2") == 32 * 3 * 16 * (2560 + 2560)
    assert expected_trainable_count("lora", "deepseek-coder-1.3b-base") == 24 * 3 * 16 * (2048 + 2048)
    assert expected_trainable_count("none", "phi-2") == 0


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_built_models_train_exactly_their_formula(model_type):
    d = 64
    want = {"none": 0, "pt": pt_trainable_count(d, M), "idpg": idpg_trainable_count(d, ENC_DIM, ENC_DIM, M),
            "lopa": lopa_trainable_count(d, ENC_DIM, ENC_DIM, M, R)}
    assert want["lopa"] == M * d + (ENC_DIM * ENC_DIM + ENC_DIM + ENC_DIM * M * R + M * R) + (
        ENC_DIM * ENC_DIM + ENC_DIM + ENC_DIM * d * R + d * R)
    for method in METHODS:
        model, _ = built(method, model_type)
        n = count_trainable(model)
        assert n == expected_trainable_count(method, model_type, num_virtual_tokens=M, lp_rank=R,
                                             enc_model_type="tiny-roberta"), method
        if method in want:
            assert n == want[method], method
        if method == "fft":
            assert n == sum(p.numel() for p in model.lm.parameters()) > 300_000
        if method not in ("none", "fft"):
            assert sum(t.numel() for t in trainable_state_dict(model).values()) == n, method


# ------------------------------------------------------------------------------------------ equivalences
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_lopa_with_gate_one_is_prompt_tuning(model_type):
    pt, tok = built("pt", model_type)
    lopa, _ = build_model("lopa", model_type, num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                          seed=11)
    lopa.eval()
    with torch.no_grad():  # u = v = 10 everywhere, so u·vᵀ = 200 and sigmoid saturates to exactly 1
        for head in (lopa.prompt.row_head, lopa.prompt.col_head):
            head.out_proj.weight.zero_()
            head.out_proj.bias.fill_(10.0)
        lopa.prompt.shared_prompt.copy_(pt.backbone.prompt_encoder["default"].embedding.weight)
    batch = batch_of(tok, PROMPTS, targets=[" 1", " 2", " 3"])
    assert torch.equal(lopa.prompt(batch["enc_input_ids"], batch["enc_attention_mask"]),
                       pt.prompt_embeds(len(PROMPTS)))
    with torch.no_grad():
        a, b = lopa(**batch), pt(**batch)
        assert a.loss.item() == b.loss.item()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(lopa(**inputs).logits, pt(**inputs).logits)
    assert torch.equal(lopa.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
                       pt.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False))


def _read(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """B×(rows·cols) head output read row-major as B×rows×cols: element [b, i, k] is flat[b, i·cols + k]."""
    return flat[:, torch.arange(rows)[:, None] * cols + torch.arange(cols)]


@pytest.mark.parametrize("method", ("lopa", "idpg"))
def test_instance_prompt_is_the_spec_formula_of_the_heads(method):
    """spec §2.1 / §3.1 at r = 2: u = row head (m·r) read as m×r, v = col head (d·r) read as d×r,
    Z[b,i,j] = Z_S[i,j]·sigmoid(sum_k u[b,i,k]·v[b,j,k]); IDPG's m·d head output read as m×d. The golden runs use
    r = 1, where a transposed reading of u or v is the same tensor, so they cannot see a layout bug."""
    model, tok = built(method, "tiny-llama")
    prompt, batch, d = model.prompt, batch_of(tok, PROMPTS), model.lm.config.hidden_size
    with torch.no_grad():
        x = prompt.encoder(batch["enc_input_ids"], batch["enc_attention_mask"]).float()

        def head(h):
            return torch.tanh(x @ h.dense.weight.T + h.dense.bias) @ h.out_proj.weight.T + h.out_proj.bias

        got = model.prompt_embeds(len(PROMPTS), batch["enc_input_ids"], batch["enc_attention_mask"])
        if method == "lopa":
            row, col = head(prompt.row_head), head(prompt.col_head)
            want, swapped = (prompt.shared_prompt * torch.sigmoid(torch.einsum("bik,bjk->bij", u, v))
                             for u, v in ((_read(row, M, R), _read(col, d, R)),
                                          (_read(row, R, M).transpose(1, 2), _read(col, d, R))))
        else:
            out = head(prompt.head)
            want, swapped = _read(out, M, d), _read(out, d, M).transpose(1, 2)
    assert got.shape == (len(PROMPTS), M, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - swapped).abs().max() > 1e-2  # the check can tell the layouts apart
    assert (want[0] - want[1]).abs().max() > 1e-3  # per-instance prompts


def test_initial_weights_and_head_dropout_follow_the_encoder_config():
    """spec §2.1 / §3.1 / §3.2: Z_S ~ N(0, 1) (LOPA's and peft's PT), head weights N(0, the encoder's
    initializer_range), out_proj biases 0, dense biases PyTorch's U(±1/√H), head dropout the encoder's
    hidden_dropout_prob, else 0.1 (CodeSage's config has none). Widths are large enough for 5 % tolerances."""
    from transformers import RobertaConfig, RobertaModel

    from custom_peft import IdpgPrompt, LopaPrompt
    from utils.codesage import CodeSageEncoder
    from utils.encoders import PooledEncoder

    width = 256
    roberta = RobertaModel(RobertaConfig(vocab_size=64, hidden_size=width, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, initializer_range=0.07, hidden_dropout_prob=0.25),
                           add_pooling_layer=False)
    codesage = CodeSageEncoder({"vocab_size": 64, "max_position_embeddings": 8, "hidden_size": width,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "initializer_range": 0.05})
    for backbone, pooling, std, p in ((roberta, "cls", 0.07, 0.25), (codesage, "pooler_l2", 0.05, 0.1)):
        torch.manual_seed(0)
        encoder = PooledEncoder(backbone, pooling)
        lopa, idpg = LopaPrompt(encoder, 50, 128, 2), IdpgPrompt(encoder, 50, 128)
        assert abs(lopa.shared_prompt.mean()) < 0.05 and abs(lopa.shared_prompt.std() - 1) < 0.05
        for head in (lopa.row_head, lopa.col_head, idpg.head):
            assert head.dropout.p == p
            for weight in (head.dense.weight, head.out_proj.weight):
                assert abs(weight.std() - std) < 0.05 * std and abs(weight.mean()) < 0.05 * std
            assert torch.count_nonzero(head.out_proj.bias) == 0
            bound = width ** -0.5
            assert head.dense.bias.abs().max() <= bound and abs(head.dense.bias.std() / (bound / 3 ** 0.5) - 1) < 0.15
    pt, _ = build_model("pt", "tiny-llama", num_virtual_tokens=50, seed=0)  # 50 × 64 values
    z_s = pt.backbone.prompt_encoder["default"].embedding.weight
    assert abs(z_s.mean()) < 0.05 and abs(z_s.std() - 1) < 0.05


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_prompt_tuning_forward_equals_peft_forward(model_type):
    """Right padding (peft's positions ignore the mask, so only right padding is comparable)."""
    model, tok = built("pt", model_type)
    batch = batch_of(tok, PROMPTS, side="right", targets=[" return 1", " 2", " os.path"])
    with torch.no_grad():
        theirs = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"])
        ours = model(**batch)
        full = full_logits_forward(model, batch)
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    assert theirs.logits.shape[1] == M + batch["input_ids"].shape[1]
    assert torch.allclose(logits[keep], theirs.logits[:, M:][keep], atol=1e-5, rtol=0)
    assert abs(full.loss.item() - theirs.loss.item()) < 1e-6
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_selective_logits_loss_equals_full_loss(method, model_type):
    model, tok = built(method, model_type)
    batch = batch_of(tok, PROMPTS, targets=[" return a + b", ")", " sys"])
    with torch.no_grad():
        selective = model(**batch)
        full = full_logits_forward(model, batch)
    assert selective.logits is None and full.logits is not None
    assert 5.0 < full.loss.item() < 12.0
    assert abs(selective.loss.item() - full.loss.item()) < 1e-5


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_left_padded_forward_equals_unpadded_rows(method, model_type):
    model, tok = built(method, model_type)
    batch = batch_of(tok, PROMPTS)
    with torch.no_grad():
        logits = model(**batch).logits
        for i in range(len(PROMPTS)):
            single = model(**row(batch, i)).logits[0]
            assert torch.allclose(logits[i][batch["attention_mask"][i].bool()], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", ("none", "pt", "lopa"))
def test_position_ids_follow_the_mask_in_forward_and_generate(method, model_type):
    """The model body receives 0, 1, 2, … over the attended (virtual + real) tokens of each left-padded row, in
    forward and at every generation step. (All four families use rotary embeddings, which see only relative
    positions, so logits alone could not tell a shifted position apart.)"""
    model, tok = built(method, model_type)
    batch = batch_of(tok, PROMPTS)
    seen = []
    hook = model.lm.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert len(seen) == 1 + 3
    m = model.num_virtual_tokens
    # the soft prompt goes after the left padding, next to its row: [left padding; virtual tokens; prompt]
    lengths = batch["attention_mask"].sum(1).tolist()
    for positions in seen[:2]:  # forward, then generate's first step over the whole prompt
        for i, n in enumerate(lengths):
            assert positions[i][-(m + n):].tolist() == list(range(m + n))
            assert not positions[i][:-(m + n)].any()  # padding
    for step, positions in enumerate(seen[2:], start=1):
        assert positions[:, -1].tolist() == [m + n + step - 1 for n in lengths]


# ---------------------------------------------------------------------------------------------- training
def _expected_trainable(method: str, name: str) -> bool:
    if method == "fft":
        return True
    if method == "lora":
        return ".lora_A." in name or ".lora_B." in name
    if method == "pt":
        return name == "backbone.prompt_encoder.default.embedding.weight"
    if method in ("lopa", "idpg"):
        return name.startswith("prompt.") and not name.startswith("prompt.encoder.")
    return False


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", ("fft", "lora", "pt", "idpg", "lopa"))
def test_gradients_reach_exactly_the_trainable_tensors_and_training_lowers_the_loss(method, model_type):
    model, tok = build_model(method, model_type, num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                             seed=5)
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == {n for n in names if _expected_trainable(method, n)}
    if method in ("lopa", "idpg"):
        assert not any(p.requires_grad for p in model.prompt.encoder.parameters())
    if method == "lopa":
        assert {n.split(".")[1] for n in trainable} == {"shared_prompt", "row_head", "col_head"}
    frozen_before = {n: p.detach().clone() for n, p in names.items() if not p.requires_grad}
    batch = batch_of(tok, PROMPTS, targets=[" return a + b", ")", " sys"])

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    start = eval_loss()
    # a soft prompt moves a random tiny LM only a little: large steps, and a smaller drop asked of it
    lr, drop = {"fft": (1e-3, 0.5), "lora": (1e-2, 0.5), "idpg": (1e-2, 0.05), "pt": (0.3, 0.05),
                "lopa": (0.1, 0.05)}[method]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # all parameters, as the paper
    torch.manual_seed(0)  # dropout (LoRA, heads) draws from the global generator
    for step in range(6):
        model.train()
        optimizer.zero_grad()
        model(**batch).loss.backward()
        for n, p in names.items():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), n
            else:
                assert p.grad is None, n
        if step == 1:  # after one step LoRA's B is non-zero, so every trainable tensor has a non-zero gradient
            assert [n for n in trainable if not names[n].grad.any()] == []
        optimizer.step()
    end = eval_loss()
    assert end < start - drop, (start, end)
    assert all(torch.equal(p, frozen_before[n]) for n, p in names.items() if not p.requires_grad)


@pytest.mark.parametrize("method", ("lora", "pt", "lopa"))
def test_gradient_checkpointing_with_a_frozen_base_gives_the_same_gradients(method):
    """Checkpointed layers of a frozen base still pass gradients to the prompt / LoRA (training's setting)."""
    model, tok = build_model(method, "tiny-llama", num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                             seed=5)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same forward in train mode as in eval mode
    batch = batch_of(tok, PROMPTS, targets=[" return a + b", ")", " sys"])
    model.train()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
    model.zero_grad()
    enable_activation_checkpointing(model.lm)
    model(**batch).loss.backward()
    assert model.lm.model.layers[0].gradient_checkpointing
    assert sum(bool(g.any()) for g in plain.values()) >= len(plain) // 2  # LoRA's A has zero gradient at B = 0
    for name, p in model.trainable_named_parameters():
        assert torch.allclose(p.grad, plain[name], atol=1e-6, rtol=1e-5), name


# -------------------------------------------------------------------------------------------- generation
def _full_forward_logits(model, single: dict, new_tokens: list[int]) -> torch.Tensor:
    """Next-token logits after each prefix of ``new_tokens``, by full forward passes without a cache."""
    ids, mask = single["input_ids"], single["attention_mask"]
    enc = {k: single[k] for k in ("enc_input_ids", "enc_attention_mask")}
    steps = []
    for t in range(len(new_tokens)):
        prefix = torch.tensor([new_tokens[:t]], dtype=ids.dtype)
        logits = model(torch.cat([ids, prefix], 1), torch.cat([mask, torch.ones_like(prefix)], 1), **enc).logits
        steps.append(logits[0, -1])
    return torch.stack(steps)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_cached_batched_generation_equals_full_forward_and_single_rows(method, model_type):
    """Greedy with the KV cache on a left-padded batch == greedy by full forward passes == one row at a time.

    For ``pt`` this is the check ``peft``'s own prompt-tuning ``generate`` fails (its logits drift after the first
    new token); ours prepends the prompt to ``inputs_embeds`` and lets the base model cache it.
    """
    model, tok = built(method, model_type)
    batch = batch_of(tok, PROMPTS)
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (len(PROMPTS), NEW_TOKENS)
    distinct = set()
    for i in range(len(PROMPTS)):
        single = row(batch, i)
        tokens = until_eos(out.sequences[i].tolist(), tok.eos_token_id)
        distinct.update(tokens)
        alone = model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        assert alone.sequences[0].tolist() == tokens
        cached = torch.stack([step[i] for step in out.logits[:len(tokens)]])
        assert torch.allclose(cached, torch.cat(alone.logits), atol=1e-4, rtol=0)
        with torch.no_grad():
            reference = _full_forward_logits(model, single, tokens)
        assert torch.allclose(cached, reference, atol=1e-4, rtol=0), (cached - reference).abs().max()
        assert reference.argmax(-1).tolist() == tokens
    assert len(distinct) >= 4  # the rows are not one repeated token


@pytest.mark.parametrize("method", ("pt", "idpg", "lopa"))
def test_sampling_expands_the_soft_prompt_per_return_sequence(method):
    """Row i's prompt serves its 3 return sequences: the same draws as a batch with each row repeated 3 times."""
    model, tok = built(method, "tiny-llama")
    batch = batch_of(tok, PROMPTS[:2])
    kwargs = dict(max_new_tokens=5, do_sample=True, top_k=0, temperature=2.0)
    torch.manual_seed(0)
    new = model.generate(**batch, num_return_sequences=3, **kwargs)
    torch.manual_seed(0)
    repeated = model.generate(**{k: v.repeat_interleave(3, 0) for k, v in batch.items()}, **kwargs)
    assert new.shape == (6, 5) and torch.equal(new, repeated)
    assert len({tuple(r) for r in new.tolist()}) >= 4  # the draws really differ
    assert model.training is False


@pytest.mark.parametrize("method", ("none", "lora", "pt", "lopa"))
def test_max_and_min_length_count_prompt_tokens_not_virtual_ones(method):
    """``max_length`` = prompt + new tokens for every method (HF would count the m virtual tokens too)."""
    model, tok = built(method, "tiny-llama")
    batch = batch_of(tok, PROMPTS)
    length = batch["input_ids"].shape[1]
    assert model.generate(**batch, max_length=length + 5, do_sample=False).shape == (len(PROMPTS), 5)
    first = model.generate(**batch, max_new_tokens=1, do_sample=False)[0, 0].item()
    # with the row's first greedy token as EOS, min_length alone keeps row 0 going for 3 new tokens
    new = model.generate(**batch, min_length=length + 3, max_new_tokens=4, do_sample=False, eos_token_id=first)
    assert new.shape[1] >= 3 and first not in new[0, :3].tolist()


# ------------------------------------------------------------------------------------ a real encoder
def test_lopa_with_a_real_pretrained_encoder():
    """all-MiniLM-L6-v2 (mean pooling over the mask): counts, frozen backbone, padding-independent prompts."""
    model, tok = built("lopa", "tiny-codegen", "minilm")
    assert model.prompt.enc_dim == 384
    assert count_trainable(model) == lopa_trainable_count(64, 384, 384, M, R)
    assert sum(p.numel() for p in model.prompt.encoder.parameters()) > 22_000_000
    assert not any(p.requires_grad for p in model.prompt.encoder.parameters())
    batch = batch_of(tok, PROMPTS, enc="minilm")
    assert (batch["enc_attention_mask"] == 0).any()  # the encoder rows really are padded
    new = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    for i in range(len(PROMPTS)):
        single = row(batch, i)
        prompt = model.prompt(single["enc_input_ids"], single["enc_attention_mask"])
        batched = model.prompt(batch["enc_input_ids"], batch["enc_attention_mask"])[i:i + 1]
        assert torch.allclose(prompt, batched, atol=1e-5, rtol=0)
        alone = model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert alone[0].tolist() == until_eos(new[i].tolist(), tok.eos_token_id)


@pytest.mark.parametrize("method", ("lopa", "idpg"))
def test_frozen_encoder_dropout_follows_the_training_mode_unless_turned_off(method):
    """As the original (its trainer's model.train() reached the frozen encoder): instance embeddings are noisy in
    train mode and exact in eval mode; ``dropout_in_training = False`` keeps the backbone in eval mode."""
    model, tok = build_model(method, "tiny-llama", num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                             seed=5)
    batch = batch_of(tok, PROMPTS)
    encoder, enc = model.prompt.encoder, (batch["enc_input_ids"], batch["enc_attention_mask"])
    model.eval()
    exact = encoder(*enc)
    assert not encoder.backbone.training and torch.equal(encoder(*enc), exact)
    model.train()
    assert encoder.backbone.training and not any(p.requires_grad for p in encoder.parameters())
    torch.manual_seed(0)
    noisy = encoder(*enc)
    assert (noisy - exact).abs().max() > 1e-3 and not noisy.requires_grad
    encoder.dropout_in_training = False
    model.train()
    assert not encoder.backbone.training and torch.equal(encoder(*enc), exact)


def test_prompt_tuning_copies_nothing_from_the_host_per_forward():
    """peft copies PT's virtual-token ids from the CPU in every ``get_prompt``; on a GPU that copy waits for all
    queued work. On the meta device (a stand-in for a GPU here) the second call must take nothing from the CPU, and
    the prompt is peft's own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _ = build_model("pt", "tiny-llama", num_virtual_tokens=M, seed=11)
    want = model.backbone.get_prompt(batch_size=2)
    assert torch.equal(model.prompt_embeds(2), want)

    class HostCopies(TorchDispatchMode):
        found: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
            if on_cpu and isinstance(out, torch.Tensor) and out.device.type != "cpu":
                HostCopies.found.append(str(func))
            return out

    model.to("meta")
    model.prompt_embeds(2)  # the first call moves the ids
    with HostCopies():
        prompt = model.prompt_embeds(2)
    assert prompt.device.type == "meta" and prompt.shape == want.shape
    assert HostCopies.found == []


@pytest.mark.parametrize("method", ("lopa", "idpg"))
def test_head_dropout_drops_the_instance_embedding_in_training_only(method):
    """spec §2.1 / §3.1: each head is dropout → dense → tanh → out_proj, the dropout acting on the encoder's embedding
    x in train mode (scaled by 1/(1-p)) and not at all in eval mode."""
    model, _ = build_model(method, "tiny-llama", num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                           seed=5)
    heads = (model.prompt.row_head, model.prompt.col_head) if method == "lopa" else (model.prompt.head,)
    x = torch.randn(3, ENC_DIM, generator=torch.Generator().manual_seed(0))

    def by_hand(h, inputs):
        return torch.tanh(inputs @ h.dense.weight.T + h.dense.bias) @ h.out_proj.weight.T + h.out_proj.bias

    with torch.no_grad():
        model.eval()
        exact = model.prompt.prompt_from(x)
        for h in heads:
            assert h.dropout.p == 0.1
            torch.testing.assert_close(h(x), by_hand(h, x))
            h.dropout.p = 0.5
        model.train()
        for h in heads:
            torch.manual_seed(3)
            got = h(x)
            torch.manual_seed(3)
            dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # the same draws
            assert 0 < int((dropped == 0).sum()) < x.numel()
            torch.testing.assert_close(got, by_hand(h, dropped))
            assert (got - by_hand(h, x)).abs().max() > 1e-3
        noisy = model.prompt.prompt_from(x)
        assert (noisy - exact).abs().max() > 1e-3


@pytest.mark.parametrize("method", ("lora", "lopa"))
def test_generate_on_a_model_in_train_mode_runs_without_dropout_and_stays_in_train_mode(method):
    """``generate`` switches to eval mode (no LoRA / head / encoder dropout) and back: called in the middle of
    training it gives the eval-mode tokens and scores, and training goes on in train mode."""
    model, tok = build_model(method, "tiny-llama", num_virtual_tokens=M, lp_rank=R, enc_model_type="tiny-roberta",
                             seed=5)
    with torch.no_grad():  # off the init (LoRA's B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    batch = batch_of(tok, PROMPTS)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    model.eval()
    want = model.generate(**batch, **kwargs)
    model.train()
    torch.manual_seed(0)
    got = model.generate(**batch, **kwargs)
    assert model.training and all(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert torch.equal(a, b)


def test_building_lora_and_pt_prints_no_deprecation_warning():
    """peft 0.21's get_peft_model reads a property transformers 5.24 deprecated: a FutureWarning in every LoRA
    training's and generation's output (three times in the smoke preset's), which is not the user's to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for method in ("lora", "pt"):
            build_model(method, "tiny-llama", seed=0)
