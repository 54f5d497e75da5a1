"""Padding-free training rows (``custom_peft.packing``): the layout, and the same loss and gradients as padding."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from custom_peft import build_model
from custom_peft.packing import gather_rows, pack_rows, plan_layout, plan_rows, row_cost
from tests.test_methods import METHODS, batch_of, built, full_logits_forward
from utils.batching import IGNORE_INDEX, round_up
from utils.models import TINY_MODEL_TYPES
from utils.registry import FOUNDATION_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

# Lengths that pad a lot (one long example among short ones), with answers to supervise.
PROMPTS = ["def add(a, b):\n    return", "x = [i * i for i in range(10)]\nprint(x) " * 6, "import os", "y=1",
           "def f():\n  pass\n" * 3]
TARGETS = [" return a + b", ")", " sys", " + 2\nprint(y)", "\n  return 3"]


# ------------------------------------------------------------------------------------------------ layout
def test_plan_rows_never_packs_a_batch_without_padding_or_a_single_example():
    assert plan_rows([512] * 8, c=16_000) is None
    assert plan_rows([300], c=16_000) is None


def test_plan_rows_places_every_example_once_and_costs_less_than_padding():
    lengths = [480, 120, 90, 200, 60, 171, 33, 250]
    rows = plan_rows(lengths, c=16_000)
    assert sorted(i for row in rows for i in row) == list(range(8))
    width = max(sum(lengths[i] for i in row) for row in rows)
    assert row_cost(len(rows), width, 16_000) < row_cost(8, 480, 16_000)
    assert len(rows) == 3 and width == 480  # 3 rows as wide as the longest beat 1 row of all 1,404 tokens
    assert plan_rows(lengths, c=100_000) == [[0, 7, 3, 5, 1, 2, 4, 6]]  # matmuls dominate: one row


def test_plan_rows_keeps_rows_short_when_attention_dominates():
    """With a small model (attention as costly as the matmuls at 100 positions) one long row would cost more."""
    lengths = [400, 390, 380, 30, 20, 10, 400, 395]
    rows = plan_rows(lengths, c=100)
    width = max(sum(lengths[i] for i in row) for row in rows)
    assert width == 400 and len(rows) == 6  # the three short ones share rows with long ones
    assert all(sum(lengths[i] for i in row) <= 400 for row in rows)


def test_plan_rows_costs_rows_at_the_width_they_are_rounded_to():
    """With a width multiple the packed rows run rounded up (``pack_rows``), and the padded batch at the collator's
    rounded width: a plan is costed so. Unrounded, 72 positions in one row would beat two rows of 64; rounded, that
    row is 128 wide and costs the same as the padded batch, so it is not packed."""
    assert plan_rows([64, 8], c=1e9) == [[0, 1]]
    assert plan_rows([64, 8], c=1e9, multiple=64, padded_width=64) is None
    assert plan_rows([70, 60], c=1e9, multiple=64, padded_width=128) == [[0, 1]]  # 192 positions beat 256
    assert plan_rows([40, 40], c=1e9, multiple=64, padded_width=64) is None  # a row of 80 would run 128 wide


def _pack(embeds, mask, labels, rows):
    """``(inputs_embeds, position_ids, labels)`` of ``rows``, as the forward lays them out."""
    index, positions, packed = pack_rows(mask, labels, rows)
    return gather_rows(embeds, index, len(rows)), positions, packed


def test_pack_restarts_positions_and_hides_each_examples_first_label():
    embeds = torch.arange(2 * 4, dtype=torch.float).reshape(2, 4, 1).expand(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # right padding
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [8, 9, IGNORE_INDEX, IGNORE_INDEX]])
    inputs, positions, packed = _pack(embeds, mask, labels, [[1, 0]])
    assert positions.tolist() == [[0, 1, 0, 1, 2]]
    assert inputs[0, :, 0].tolist() == [4.0, 5.0, 0.0, 1.0, 2.0]
    assert packed.tolist() == [[IGNORE_INDEX, 9, IGNORE_INDEX, 6, 7]]
    inputs, positions, packed = _pack(embeds, mask, labels, [[0], [1]])  # the short row ends in zero filler
    assert positions.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert inputs[1, 2].tolist() == [0.0, 0.0, 0.0]
    assert packed[1].tolist() == [IGNORE_INDEX, 9, IGNORE_INDEX]
    _, positions, _ = _pack(embeds, mask, labels, [[0], [1]] + [[]])  # an empty row: all filler, every position 0
    assert positions.tolist()[2] == [0, 0, 0]
    left = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])  # left padding is laid out too
    inputs, positions, _ = _pack(embeds, left, labels, [[1, 0]])
    assert inputs[0, :, 0].tolist() == [6.0, 7.0, 0.0, 1.0, 2.0] and positions.tolist() == [[0, 1, 0, 1, 2]]


def test_the_planned_supervised_positions_are_those_boolean_indexing_picks():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX],
                           [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]])
    hidden = torch.randn(3, 4, 5)
    for width_constant in (None, 1e9):  # the padded batch, then one packed row
        layout = plan_layout(mask, labels, width_constant)
        run = labels if layout.rows is None else layout.labels
        rows = hidden if layout.rows is None else gather_rows(hidden, layout.index, len(layout.rows))
        want = rows[:, :-1][run[:, 1:] != IGNORE_INDEX]
        assert torch.equal(rows.reshape(-1, 5).index_select(0, layout.predictors), want)
        assert layout.targets.tolist() == [2, 3, 4, 7, 9] and not layout.full
    assert plan_layout(mask, labels, 1e9).rows == [[0, 1, 2]]
    assert plan_layout(torch.ones(2, 3, dtype=torch.long), labels[:2, :3], 1e9).full


# ------------------------------------------------------------------------------------------ equivalence
def _loss_and_grads(model, batch, packing: bool):
    model.packing = packing
    model.zero_grad(set_to_none=True)
    try:
        loss = model(**batch).loss
    finally:
        model.packing = False
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_packed_rows_give_the_padded_batchs_loss_and_gradients(method, model_type):
    """Eval mode (no dropout draws, which differ with the layout); the model body sees fewer, fuller rows."""
    model, tok = built(method, model_type)
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    seen = []
    hook = model.lm.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"].shape[:2] if kwargs.get(
            "inputs_embeds") is not None else kwargs["input_ids"].shape, kwargs["position_ids"].clone())),
        with_kwargs=True)
    try:
        padded_loss, padded_grads = _loss_and_grads(model, batch, packing=False)
        packed_loss, packed_grads = _loss_and_grads(model, batch, packing=True)
    finally:
        hook.remove()
    (padded_shape, _), (packed_shape, positions) = seen
    m = model.num_virtual_tokens
    lengths = (batch["attention_mask"].sum(1) + m).tolist()
    assert padded_shape == (5, max(lengths)) and packed_shape == (1, sum(lengths))
    assert (positions == 0).sum() == 5  # each example starts over at position 0
    assert 5.0 < padded_loss.item() < 12.0
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5
    model.packing = True
    try:
        with torch.no_grad():
            packed_full = full_logits_forward(model, batch)  # packed too, through the model's own loss
    finally:
        model.packing = False
    assert packed_full.logits is None and abs(packed_full.loss.item() - padded_loss.item()) < 1e-5
    assert padded_grads.keys() == packed_grads.keys()
    if method != "none":
        assert padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["pt", "lora"])
def test_packed_rows_rounded_to_a_multiple_give_the_unrounded_and_the_padded_loss_and_gradients(method):
    """``packed_width_multiple`` (the trainer's --pad_to_multiple_of): the packed row runs as wide as its tokens
    rounded up to the multiple, the rest filler that is its own sequence with no label. The loss and the gradients
    are those of the unrounded packed row and of the padded batch; with full logits too."""
    model, tok = built(method, "tiny-llama")
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    widths = []
    hook = model.lm.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["position_ids"].shape), with_kwargs=True)
    model._attention_width = 1e9  # matmuls dominate: the whole batch goes into one row
    try:
        padded = _loss_and_grads(model, batch, packing=False)
        packed = _loss_and_grads(model, batch, packing=True)
        model.packed_width_multiple = 64
        rounded = _loss_and_grads(model, batch, packing=True)
        model.packing = True
        with torch.no_grad():
            rounded_full = full_logits_forward(model, batch).loss
    finally:
        model.packing, model.packed_width_multiple, model._attention_width = False, None, None
        hook.remove()
    tokens = int(batch["attention_mask"].sum()) + 5 * model.num_virtual_tokens
    assert widths[1:] == [(1, tokens), (1, 64 * -(-tokens // 64)), (1, 64 * -(-tokens // 64))]
    assert tokens % 64  # the rounding added filler
    for loss in (rounded[0], rounded_full):
        assert abs(loss.item() - packed[0].item()) < 1e-6 and abs(loss.item() - padded[0].item()) < 1e-5
    assert rounded[1].keys() == packed[1].keys() == padded[1].keys() and rounded[1]
    for name, grad in rounded[1].items():
        torch.testing.assert_close(grad, packed[1][name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(grad, padded[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_leaves_a_batch_without_padding_and_the_logits_path_alone():
    model, tok = built("lopa", "tiny-llama")
    same_length = batch_of(tok, ["def a(x): return x", "def b(y): return y"], side="right",
                           targets=[" + 1", " - 1"])
    padded = batch_of(tok, PROMPTS, side="right")
    assert same_length["attention_mask"].all() and not padded["attention_mask"].all()
    seen = []
    hook = model.lm.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    model.packing = True
    try:
        with torch.no_grad():
            model(**same_length)
            logits = model(**padded).logits  # no labels: never packed
    finally:
        model.packing = False
        hook.remove()
    assert seen == [2, 5] and logits.shape[:2] == padded["input_ids"].shape


def test_packed_rows_keep_a_sliding_window_inside_each_example(monkeypatch):
    """Phi-3-mini's config has a 2,047-token sliding window and a packed row is far wider than one example; here
    tiny-phi-3 gets a 16-token window, shorter than the long example, so the window changes the loss."""
    spec = FOUNDATION_MODELS["tiny-phi-3"]
    windowed = dataclasses.replace(spec, arch={**spec.arch, "sliding_window": 16})
    models = {}
    for name, s in (("full", spec), ("window", windowed)):
        monkeypatch.setitem(FOUNDATION_MODELS, "tiny-phi-3", s)
        models[name], tok = build_model("fft", "tiny-phi-3", seed=11)
        models[name].eval()
    model = models["window"]
    assert model.lm.config.sliding_window == 16
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    assert batch["attention_mask"].sum(1).max() > 3 * 16
    model._attention_width = 1e9  # matmuls dominate: the whole batch goes into one row
    padded_loss, padded_grads = _loss_and_grads(model, batch, packing=False)
    packed_loss, packed_grads = _loss_and_grads(model, batch, packing=True)
    full_loss, _ = _loss_and_grads(models["full"], batch, packing=False)
    assert abs(padded_loss.item() - full_loss.item()) > 1e-4  # the window is in effect
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pack_takes_an_example_with_an_empty_mask():
    """A row of the batch with no attended token (all-zero mask) is planned like any other; packed after a row's
    last token it used to index past the row (IndexError)."""
    lengths = [4, 0, 2]
    rows = plan_rows(lengths, c=10.0)
    assert rows == [[0, 2, 1]]  # one row of 6 beats three of 4, the empty example last
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    embeds = torch.arange(12, dtype=torch.float).reshape(3, 4, 1)
    labels = torch.tensor([[1, 2, 3, 4], [IGNORE_INDEX] * 4, [5, 6, IGNORE_INDEX, IGNORE_INDEX]])
    inputs, positions, packed = _pack(embeds, mask, labels, rows)
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert inputs[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 8.0, 9.0]
    assert packed.tolist() == [[IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX, 6]]
    assert _pack(embeds, mask, labels, [[0, 1], [2]])[2].tolist() == [[IGNORE_INDEX, 2, 3, 4],
                                                                     [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX]]


def _pack_reference(mask, labels, rows, multiple=None):
    """``pack_rows`` token by token: each row holds its examples' attended positions in order, then filler, as wide
    as the fullest row rounded up to ``multiple``."""
    batch, length = mask.shape
    width = max(int(mask[row].sum()) if row else 0 for row in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    index, positions, packed = [], [], []
    for row in rows:
        cells = [(i * length + t, p, IGNORE_INDEX if p == 0 else int(labels[i, t]))
                 for i in row for p, t in enumerate(mask[i].nonzero().squeeze(1).tolist())]
        cells += [(batch * length, 0, IGNORE_INDEX)] * (width - len(cells))
        for got, cell in zip((index, positions, packed), zip(*cells)):
            got.extend(cell)
    shape = (len(rows), width)
    return torch.tensor(index, dtype=torch.long), torch.tensor(positions).view(shape), torch.tensor(packed).view(shape)


def test_pack_rows_lays_out_any_mask_and_row_plan_as_token_by_token_packing():
    """Random masks (right, left and scattered padding, empty examples) and row plans (empty rows too)."""
    rng = random.Random(0)
    for _ in range(300):
        batch, length = rng.randint(1, 7), rng.randint(1, 9)
        mask = (torch.rand(batch, length, generator=torch.Generator().manual_seed(rng.randint(0, 10**6))) < 0.5).long()
        for i in range(batch):
            if rng.random() < 0.7:  # most are contiguous, as the collator pads
                n = rng.randint(0, length)
                mask[i] = 0
                (mask[i, :n] if rng.random() < 0.7 else mask[i, length - n:]).fill_(1)
        labels = torch.randint(0, 50, (batch, length))
        labels[torch.rand(batch, length) < 0.3] = IGNORE_INDEX
        order = rng.sample(range(batch), batch)
        cuts = sorted(rng.sample(range(1, batch), rng.randint(0, batch - 1))) if batch > 1 else []
        rows = [order[a:b] for a, b in zip([0] + cuts, cuts + [batch])] + ([[]] if rng.random() < 0.2 else [])
        multiple = rng.choice([None, None, 1, 4, 8])  # --pad_to_multiple_of's rounding of the rows
        got_all = pack_rows(mask, labels, rows, multiple)
        for got, want in zip(got_all, _pack_reference(mask, labels, rows, multiple)):
            assert torch.equal(got, want.view(got.shape)), (mask, rows, multiple)
        assert got_all[1].shape[1] % (multiple or 1) == 0


@pytest.mark.parametrize("model_type", ["tiny-llama", "tiny-phi-2"])
def test_a_batch_that_packs_runs_the_modules_in_the_order_of_one_that_does_not(model_type):
    """ZeRO-3 gathers each module's weights as it runs, in the same order on every process; two processes whose
    batches pack differently used to run the embedding before vs inside the model body (a collective mismatch)."""
    model, tok = built("fft", model_type)
    same_length = batch_of(tok, ["def a(x): return x", "def b(y): return y"], side="right", targets=[" + 1", " - 1"])
    padded = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    order, rows = [], []
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
             for name, module in model.lm.named_modules() if name]
    hooks.append(model.lm.base_model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(len(kwargs["inputs_embeds"])), with_kwargs=True))
    orders = []
    model.packing = True
    try:
        with torch.no_grad():
            for batch in (padded, same_length):
                order.clear()
                model(**batch)
                orders.append(list(order))
    finally:
        model.packing = False
        for hook in hooks:
            hook.remove()
    assert rows == [1, 2]  # the padded batch was packed into one row, the other was not packed
    assert orders[0] == orders[1] and orders[0][0].endswith("embed_tokens")


# ---------------------------------------------------------------------------------------- host planning
def _skip_unless_sdpa(model):
    """The forward builds masks only for SDPA attention; elsewhere (CodeGen under transformers 5.17 runs eager) it
    leaves them to transformers, which reads the device to build them."""
    if model.lm.config._attn_implementation != "sdpa":
        pytest.skip(f"{model.lm.config.model_type} runs {model.lm.config._attn_implementation} attention here")


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", ["none", "lora", "pt", "idpg", "lopa"])
@pytest.mark.parametrize("packing", [True, False])
def test_a_training_forward_and_backward_read_nothing_from_the_device(model_type, method, packing, monkeypatch):
    """With the collator's host copy, a training step never waits for a GPU: no value read back (a scalar, a
    data-dependent shape) and no copy from the host but the one ``to_device`` makes. The model runs on the meta
    device, which has no data: any read fails there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import custom_peft.tuned_model as tuned_model
    from utils.batching import HostCopy

    model, tok = build_model(method, model_type, num_virtual_tokens=4, lp_rank=2, enc_model_type="tiny-roberta",
                             seed=0)
    _skip_unless_sdpa(model)
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    model.train()
    model.packing = packing
    model._attention_width = 1e9 if packing else None  # pack whenever there is padding
    model.to("meta")
    sent, allowed = [], [False]

    def to_device(tensors, device):  # the one sanctioned copy (pinned and asynchronous on a GPU)
        sent.append(len(tensors))
        allowed[0] = True
        try:
            return [t.to(device) for t in tensors]
        finally:
            allowed[0] = False

    monkeypatch.setattr(tuned_model, "to_device", to_device)

    class HostCopies(TorchDispatchMode):
        found: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            from_host = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() for a in args)
            if from_host and isinstance(out, torch.Tensor) and out.device.type == "meta" and not allowed[0]:
                HostCopies.found.append(str(func))
            return out

    on_meta = {k: v.to("meta") for k, v in batch.items() if isinstance(v, torch.Tensor)}
    host = HostCopy(batch["attention_mask"], batch["labels"], not batch["enc_attention_mask"].all())
    model(**on_meta, host=host)  # a first step may settle things once (PT moves its prompt ids)
    with HostCopies():
        loss = model(**on_meta, host=host).loss
        if loss.requires_grad:  # "none" trains nothing
            loss.backward()
    assert loss.device.type == "meta" and HostCopies.found == [], HostCopies.found
    assert sent == [5 if packing else 2] * 2  # one copy a step: the packed layout and the supervised positions


def test_a_host_copy_that_does_not_match_its_batch_is_not_used():
    """A batch's ``host`` copy of another batch, or of tensors changed since collation, used to be trusted whenever
    the mask's shape matched, and its encoder flag even when not: stale labels, mask or encoder padding, a wrong
    loss (7.6409 for 7.6613 with one row's labels dropped). On the CPU the values are compared; it falls back."""
    from utils.batching import HostCopy

    model, tok = built("lopa", "tiny-llama")
    batch = batch_of(tok, PROMPTS[:3], side="right", targets=TARGETS[:3])
    assert batch["attention_mask"].sum(1).tolist() == [14, 117, 4] and not batch["enc_attention_mask"].all()
    host = HostCopy(batch["attention_mask"], batch["labels"], True)
    no_labels = batch["labels"].clone()
    no_labels[0] = IGNORE_INDEX
    shorter = {k: v.clone() for k, v in batch.items()}
    shorter["attention_mask"][1, -3:] = 0
    shorter["labels"][1, -3:] = IGNORE_INDEX
    stale = [({**batch, "labels": no_labels}, host), (shorter, host),
             (batch, HostCopy(batch["attention_mask"], batch["labels"], False)),  # encoder rows are padded
             (batch, HostCopy(batch["attention_mask"][:, 1:], batch["labels"][:, 1:], False))]  # another shape
    with torch.no_grad():
        assert model(**batch, host=host).loss.item() == model(**batch).loss.item()
        for case, (stale_batch, stale_host) in enumerate(stale):
            assert model(**stale_batch, host=stale_host).loss.item() == model(**stale_batch).loss.item(), case
    assert host.matches(batch["attention_mask"].to("meta"), batch["labels"].to("meta"))  # a device: shapes only


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("method", ["none", "pt", "lopa"])
@pytest.mark.parametrize("packing", [True, False])
def test_the_masks_built_here_give_transformers_own_results(model_type, method, packing, monkeypatch):
    """The 4-D masks the forward builds (to spare transformers' reads of the device) are the ones transformers
    builds: the same loss and gradients, to the last bit, as with transformers' own masks."""
    import custom_peft.tuned_model as tuned_model

    model, tok = built(method, model_type)
    _skip_unless_sdpa(model)
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    model._attention_width = 1e9 if packing else None
    results = {}
    for own in (True, False):
        monkeypatch.setattr(tuned_model.TunedModel, "_own_masks_exact", lambda self, layout, own=own: own)
        results[own] = _loss_and_grads(model, batch, packing=packing)
    model._attention_width = None
    assert torch.equal(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[True][1].items():
        assert torch.equal(grad, results[False][1][name]), name


@pytest.mark.parametrize("prompts", [PROMPTS, ["def a(x): return x", "def b(y): return y"]])
def test_the_encoder_masks_built_here_give_transformers_own_embeddings(prompts):
    """The frozen encoder told on the host whether its rows are padded (no mask, or a 4-D one) gives the embeddings
    transformers gives when it decides that itself, to the last bit."""
    from utils.encoders import load_encoder

    encoder, enc_tok = load_encoder("tiny-roberta")
    assert encoder._builds_sdpa_mask
    enc = enc_tok(prompts, padding=True, return_tensors="pt")
    padded = not bool(enc["attention_mask"].all())
    assert padded == (prompts is PROMPTS)
    want = encoder(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(encoder(enc["input_ids"], enc["attention_mask"], padded), want)
    if padded:  # the check can fail: told wrongly, the padded rows come out otherwise
        assert not torch.equal(encoder(enc["input_ids"], enc["attention_mask"], False), want)


def test_the_width_constant_is_where_attention_costs_as_much_as_the_matmuls():
    """Per token 2N FLOPs of matmuls and 4·d·L·W of attention over a row of W: equal at W = N / (2·d·L), about 17,000
    positions for phi-2 (2.78 B parameters, d = 2,560, L = 32). The plans the forward picks depend on it: there, the
    mixed-length batch packs into 3 rows of the longest example's width, not one row of all its tokens."""
    from transformers import AutoModelForCausalLM

    from custom_peft.packing import attention_width_constant
    from utils.models import model_config
    from utils.registry import get_model_spec

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model_config(get_model_spec("phi-2")))
    n = sum(p.numel() for p in lm.parameters())
    assert 2.77e9 < n < 2.79e9
    c = attention_width_constant(lm)
    assert c == n / (2 * 2560 * 32) and 16_900 < c < 17_000
    lengths = [480, 120, 90, 200, 60, 171, 33, 250]
    assert len(plan_rows(lengths, c)) == 3
    tiny, _ = built("none", "tiny-codegen")  # GPT-style config names: n_embd, n_layer
    cfg = tiny.lm.config
    assert attention_width_constant(tiny.lm) == sum(p.numel() for p in tiny.lm.parameters()) / (
        2 * cfg.n_embd * cfg.n_layer)


def test_packing_gives_transformers_eager_attention_the_padded_loss():
    """Outside SDPA (CodeGen runs eager under transformers 5.17; any model loaded with attn_implementation="eager")
    the boolean 4-D masks built here are not what the kernel takes (eager adds its mask to the scores): the forward
    leaves the masks to transformers, and the loss is SDPA's, padded and packed."""
    model, tok = build_model("pt", "tiny-llama", num_virtual_tokens=4, seed=11)
    model.eval()
    batch = batch_of(tok, PROMPTS, side="right", targets=TARGETS)
    sdpa_loss, _ = _loss_and_grads(model, batch, packing=False)
    model.lm.set_attn_implementation("eager")
    assert model.lm.config._attn_implementation == "eager"
    model._attention_width = 1e9  # pack whenever there is padding
    for packing in (False, True):
        loss, _ = _loss_and_grads(model, batch, packing=packing)
        assert abs(loss.item() - sdpa_loss.item()) < 1e-5, packing


# ------------------------------------------------------------------------------ rounded widths (review s19)
def test_plan_rows_with_a_multiple_never_packs_an_unpadded_batch_nor_costs_more_than_padding():
    """--pad_to_multiple_of: a batch whose rows all fill its (rounded) width is never packed, and a chosen plan,
    costed at the widths the decoder runs, is cheaper than the padded batch and no dearer than the plan the
    unrounded estimate would have chosen (run rounded)."""
    rng = random.Random(5)
    for _ in range(3000):
        multiple, m, c = rng.choice([8, 16, 64]), rng.choice([0, 4, 10]), rng.choice([100.0, 2e3, 1.4e4, 1e9])
        batch = rng.randint(1, 9)
        if rng.random() < 0.3:  # no padding: every row as long as the rounded width
            width = multiple * rng.randint(1, 8)
            lengths, padded = [width + m] * batch, width + m
        else:
            tokens = [rng.randint(1, 400) for _ in range(batch)]
            lengths, padded = [t + m for t in tokens], round_up(max(tokens), multiple) + m
        rows = plan_rows(lengths, c, multiple, padded)
        padded_cost = row_cost(batch, padded, c)

        def cost(plan):
            if plan is None:
                return padded_cost
            return row_cost(len(plan), round_up(max(sum(lengths[i] for i in r) for r in plan), multiple), c)

        if len(set(lengths)) == 1 and padded == lengths[0]:
            assert rows is None, (lengths, multiple, c)
        if rows is not None:
            assert sorted(i for r in rows for i in r) == list(range(batch))
            assert cost(rows) < padded_cost
        assert cost(rows) <= cost(plan_rows(lengths, c))


@pytest.mark.parametrize("method, model_type", [("fft", "tiny-llama"), ("lora", "tiny-codegen"), ("pt", "tiny-llama"),
                                               ("idpg", "tiny-phi-3"), ("lopa", "tiny-llama")])
def test_rounded_widths_give_the_plain_loss_and_gradients_for_every_method(method, model_type):
    """The collator's rounded rows and the model's rounded packed rows (a multiple below the row length, one that
    does not divide it, one wider than every row), packed or padded, selective logits or full: the loss and the
    gradients of the unrounded padded batch, for one example, equal lengths and mixed ones. Every trained tensor
    gets a gradient (what the trainer's kept gradients under --compile_mode reduce-overhead rely on: AdamW would
    otherwise decay and move a tensor that had none)."""
    from utils.batching import Collator
    from utils.encoders import load_encoder_tokenizer

    model, tok = built(method, model_type)
    enc_tok = load_encoder_tokenizer("tiny-roberta")

    def collate(indices, multiple):
        examples = []
        for i in indices:
            ids, answer = tok(PROMPTS[i])["input_ids"], tok(TARGETS[i], add_special_tokens=False)["input_ids"]
            examples.append({"task_id": str(i), "input_ids": ids + answer, "labels": [IGNORE_INDEX] * len(ids) + answer,
                             "enc_input_ids": enc_tok(PROMPTS[i])["input_ids"]})
        batch = Collator(tok.pad_token_id, enc_tok.pad_token_id, pad_to_multiple_of=multiple, host_copy=True)(examples)
        batch.pop("task_ids")
        return batch

    def run(batch, packing, multiple, selective):
        model.packed_width_multiple, model.selective_logits, model._attention_width = multiple, selective, 1e9
        try:
            return _loss_and_grads(model, batch, packing)
        finally:
            model.packed_width_multiple, model.selective_logits, model._attention_width = None, True, None

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for indices in ([1], [2, 2, 2], [0, 1, 2, 3, 4]):
        loss, grads = run(collate(indices, None), False, None, True)
        assert grads.keys() == trained
        for multiple in (7, 16, 128):
            batch = collate(indices, multiple)
            assert batch["input_ids"].shape[1] % multiple == 0
            for packing in (False, True):
                for selective in (True, False):
                    got_loss, got_grads = run(batch, packing, multiple, selective)
                    assert abs(got_loss.item() - loss.item()) < 1e-5, (indices, multiple, packing, selective)
                    assert got_grads.keys() == trained
                    for name, grad in grads.items():
                        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
