"""utils/decode_loop.py: the project's greedy loop gives generate's predictions, judging stops every k steps."""
import random

import pytest
import torch

import generate_preds
from custom_peft import build_model
from tests.test_generation import _perturb, _refused_leaving_the_log_dir_as_it_was
from utils.batching import Collator, TaskDataset
from utils.data import load_task_split
from utils.decode_loop import BucketedStaticLayer, GreedyDecoder, check_plain_greedy, own_loop_chosen
from utils.errors import UserError
from utils.generation import GenConfig, generate_batch, generate_predictions, resolve_gen_config
from utils.models import load_tokenizer
from utils.stopping import StopOnText
from utils.tasks import CRUXEVAL_STOP_SEQUENCES, MBPP_STOP_SEQUENCES, get_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _per_step(crit: StopOnText, rows: list[list[int]]) -> list[int | None]:
    """lengths from the per-step path generate drives (prompt of 2 ids in front)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[5, 5] + r + [0] * (width - len(r)) for r in rows])
    for n in range(1, width + 1):
        if crit(ids[:, :2 + n]).all():
            break
    return crit.lengths


def _every(crit: StopOnText, rows: list[list[int]], k: int) -> list[int | None]:
    """lengths from observe, fed k steps at a time with the shortest look-back it accepts."""
    width = max(len(r) for r in rows)
    padded = [r + [0] * (width - len(r)) for r in rows]
    checked = 0
    while checked < width and not crit.finished:
        made = min(width, checked + k)
        offset = max(0, checked + 1 - crit.window)
        crit.observe([r[offset:made] for r in padded], offset, checked)
        checked = made
    return crit.lengths


def test_observing_every_k_steps_ends_each_row_where_the_per_step_check_does():
    tok = load_tokenizer("tiny-llama")
    rng = random.Random(1)
    pieces = ["x", " = ", "1", "\n", "    ", "def", "if", "class", "assert", '"""', "print", "```", "é", "ü→",
              "[ANSWER]", "[/", "ANSWER]", "AN", "SWER", "\t", "f(", ")"]
    eos = tok.eos_token_id
    for stops in (MBPP_STOP_SEQUENCES, CRUXEVAL_STOP_SEQUENCES, ()):
        rows = [tok("".join(rng.choice(pieces) for _ in range(25)), add_special_tokens=False)["input_ids"]
                for _ in range(40)]
        for row in rows[::5]:  # some rows emit EOS somewhere
            row.insert(rng.randrange(1, len(row)), eos)
        budgets = [rng.choice([3, 9, 1000]) for _ in rows]
        want = _per_step(StopOnText(tok, stops, budgets, [eos]), rows)
        assert len({w for w in want}) > 3  # stop strings, EOS and budgets all end rows here
        for k in (1, 2, 7, 64):
            assert _every(StopOnText(tok, stops, budgets, [eos]), rows, k) == want, (stops, k)
    crit = StopOnText(tok, MBPP_STOP_SEQUENCES, [100])
    with pytest.raises(ValueError, match="from index 6 on, got them from 7"):
        crit.observe([[1, 2, 3]], 7, 14)  # a window that does not reach back far enough would miss a stop string


def _models():
    """(name, model, tokenizer, encoder tokenizer), trainable weights moved off their init."""
    out = []
    for method, model_type in (("none", "tiny-llama"), ("pt", "tiny-phi-2"), ("lopa", "tiny-phi-2"),
                               ("lora", "tiny-codegen"), ("idpg", "tiny-llama")):
        model, tok = build_model(method, model_type, num_virtual_tokens=4, enc_model_type="tiny-roberta", seed=5)
        _perturb(model, 11, 0.3)
        out.append((f"{method}-{model_type}", model.eval(), tok, model.enc_tokenizer))
    return out


@pytest.fixture(scope="module")
def models():
    return _models()


@pytest.mark.parametrize("task_name", ["mbpp", "cruxeval_output_prediction"])
def test_own_loop_predicts_what_generate_predicts(models, data_paths, task_name):
    """Real prompts with the task's stop strings, an EOS that rows emit mid-way and (CRUXEval) budgets that differ
    per row: the same raw completions and new-token counts as generate, with stops judged every step or every 5."""
    task = get_task(task_name)
    records = load_task_split(task_name, "test", data_paths["mbpp" if task_name == "mbpp" else "cruxeval"], limit=6)
    for name, model, tok, enc_tok in models:
        dataset = TaskDataset(task, records, tok, enc_tok, num_virtual_tokens=model.num_virtual_tokens, train=False)
        cfg = resolve_gen_config(task, max_new_tokens=20)
        if not task.is_mbpp:  # a total cap that leaves the rows different budgets, 20 new tokens at most
            cfg.max_total_tokens = min(dataset.lengths()) + 12
            assert len({cfg.budget(n) for n in dataset.lengths()}) > 2

        def run(decoder):
            counts = []
            got = generate_predictions(model, tok, enc_tok, task, records, batch_size=3, gen_config=cfg,
                                       progress=False, decoder=decoder, on_batch=lambda fresh, n: counts.append(n))
            return got, sum(counts)

        without_eos = run(None)
        # make the 3rd new token of the shortest prompt (the largest budget) an EOS: rows that emit it stop there
        shortest = min(range(len(records)), key=lambda i: dataset.lengths()[i])
        first = Collator(tok.pad_token_id, getattr(enc_tok, "pad_token_id", None), padding_side="left")(
            [dataset[shortest]])
        inputs = {k: first[k] for k in ("input_ids", "attention_mask", "enc_input_ids", "enc_attention_mask")
                  if k in first}
        eos = int(model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, 2])
        config, saved = model.lm.generation_config, model.lm.generation_config.eos_token_id
        config.eos_token_id = eos
        try:
            want = run(None)
            assert want[1] < without_eos[1], name  # the EOS ended rows early
            assert run(GreedyDecoder(check_every=1)) == want, name
            assert run(GreedyDecoder(check_every=5)) == want, name
        finally:
            config.eos_token_id = saved


def test_the_loop_ends_within_k_steps_of_the_last_stop_and_reuses_its_cache(models, data_paths):
    task = get_task("mbpp")
    name, model, tok, enc_tok = models[1]
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=3)
    batch = Collator(tok.pad_token_id, padding_side="left")(
        list(TaskDataset(task, records, tok, train=False, num_virtual_tokens=model.num_virtual_tokens)))
    decoder = GreedyDecoder(check_every=4)
    outs = []
    for budget in ([5, 2, 7], [5, 2, 7]):
        crit = StopOnText(tok, (), budget)
        outs.append(model.decode_greedy(decoder, batch["input_ids"], batch["attention_mask"], max_new_tokens=30,
                                        criterion=crit))
        assert crit.lengths == budget
    # stops judged at 4 and 8: every row has ended by step 8, so the loop made 8 tokens, not 30
    assert outs[0].shape == (3, 8) and torch.equal(outs[0], outs[1])
    assert decoder.caches.allocations == 1  # same shape: the static cache (and its CUDA graphs) is reused


def test_compiled_step_traces_as_one_graph_and_gives_the_same_tokens(models, data_paths):
    """The decoding step compiles without graph breaks (fullgraph) and once for every batch of this run (two batches
    of two prompts, of different lengths, hence cache lengths and KV buckets), for the phi, llama and codegen
    architectures (CPU; CUDA graphs are a GPU matter)."""
    from torch._dynamo.utils import counters

    task = get_task("mbpp")
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=4)
    cfg = resolve_gen_config(task, max_new_tokens=12)
    for name, model, tok, enc_tok in models:
        if name.startswith(("lopa", "idpg")):
            continue  # the architectures of pt and none: the encoder runs before the loop
        want = generate_predictions(model, tok, enc_tok, task, records, batch_size=2, gen_config=cfg, progress=False)
        torch.compiler.reset()
        counters.clear()
        decoder = GreedyDecoder(check_every=3, compile_kwargs={"backend": "eager", "fullgraph": True,
                                                               "dynamic": False})
        for _ in range(2):  # the second run repeats the first one's shapes: no new compilation
            got = generate_predictions(model, tok, enc_tok, task, records, batch_size=2, gen_config=cfg,
                                       progress=False, decoder=decoder, pad_to_multiple_of=64)
            assert got == want, name
            assert len(decoder.step_shapes) >= len(decoder.caches.shapes) > 1, name
            assert counters["stats"]["unique_graphs"] == 1, (name, dict(counters["stats"]))
    torch.compiler.reset()


def _long_batch(method: str, seed: int = 3) -> dict:
    """Three left-padded rows of 40 random ids (one unpadded), and the encoder's input for LOPA."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 2000, (3, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :7], mask[1, :30] = 0, 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if method == "lopa":
        batch.update(enc_input_ids=torch.randint(5, 500, (3, 12), generator=gen),
                     enc_attention_mask=torch.ones(3, 12, dtype=torch.long))
    return batch


def _decode(model, decoder, batch, new_tokens, logits_out=None):
    return model.decode_greedy(decoder, **batch, max_new_tokens=new_tokens,
                               criterion=StopOnText(None, (), [new_tokens] * batch["input_ids"].shape[0]),
                               logits_out=logits_out)


@pytest.mark.parametrize("method, model_type", [("none", "tiny-llama"), ("pt", "tiny-phi-2"), ("lopa", "tiny-phi-2"),
                                                ("none", "tiny-codegen"), ("pt", "tiny-codegen"),
                                                ("none", "tiny-phi-3")])
def test_attending_over_the_used_cache_buckets_gives_the_full_views_tokens_and_logits(method, model_type):
    """44 positions of prompt (and soft prompt) plus 100 new tokens cross the 64- and 128-position bucket boundaries:
    the bucketed view gives generate's tokens and the full view's, with its logits to 1e-5 (fp32)."""
    model, _ = build_model(method, model_type, num_virtual_tokens=4, enc_model_type="tiny-roberta", seed=5)
    _perturb(model, 11, 0.3)
    model.eval()
    model.lm.generation_config.eos_token_id = None  # every row makes all 100 tokens
    batch = _long_batch(method)
    want = model.generate(**batch, max_new_tokens=100, do_sample=False)
    runs = {}
    for bucket in (64, None):
        decoder, logits = GreedyDecoder(check_every=7, kv_bucket=bucket), []
        runs[bucket] = _decode(model, decoder, batch, 100, logits), torch.stack(logits, dim=1), decoder
    (tokens, logits, decoder), (full_tokens, full_logits, full) = runs[64], runs[None]
    assert torch.equal(tokens, want) and torch.equal(tokens, full_tokens)
    assert torch.allclose(logits, full_logits, rtol=0, atol=1e-5), (logits - full_logits).abs().max()
    assert {s[2] for s in decoder.step_shapes} == {64, 128, 192}  # two boundaries crossed
    assert {s[2] for s in full.step_shapes} == {192} and decoder.full_view_reason is None  # 144 positions, rounded


def test_attention_reads_only_the_bucket_in_use(models, monkeypatch):
    """The keys attention sees and the 4-D mask's width are the bucket in use (prefill included), not the cache's
    length: at 40 prompt positions and 60 new tokens, 64 then 128 of 128; with kv_bucket=16, 48 to 112."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((key.shape[-2], None if attn_mask is None else attn_mask.shape[-1]))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for name, model, _, _ in models[:2]:  # llama and phi-2: sdpa attention in transformers 5.24 and 5.17
        assert model.lm.config._attn_implementation == "sdpa", name
        batch = _long_batch("none")
        shift = model.num_virtual_tokens
        for bucket, widths in ((64, {64, 128}), (16, set(range(48, 113 + shift, 16))), (None, {128})):
            seen.clear()
            _decode(model, GreedyDecoder(kv_bucket=bucket), batch, 60)
            assert {k for k, _ in seen} == widths and {m for _, m in seen} == widths, (name, bucket, set(seen))


def test_a_sliding_window_cache_keeps_the_full_view_and_an_eager_step_and_says_why(monkeypatch):
    """Phi-3 with a window shorter than the sequence keeps transformers' sliding-window cache layers, which cannot
    be cut to a bucket: the loop attends over the whole cache, as without buckets, and says why. Their position
    counter is a Python int, which would compile the step again at every step (29 graphs for the 30 new tokens of
    the 3 x 40 batch below, seen before the fix): the step runs eager for such a batch, and compiled again for the
    next batch that fits the window."""
    from torch._dynamo.utils import counters

    from utils.registry import get_model_spec

    monkeypatch.setitem(get_model_spec("tiny-phi-3").arch, "sliding_window", 64)
    model, _ = build_model("none", "tiny-phi-3", seed=5)
    model.eval()
    model.lm.generation_config.eos_token_id = None
    batch = _long_batch("none")
    decoder = GreedyDecoder(kv_bucket=64)
    got = _decode(model, decoder, batch, 30)
    assert decoder.full_view_reason.startswith("StaticSlidingWindowLayer cache layers (a sliding window shorter")
    assert not any(isinstance(layer, BucketedStaticLayer) for layer in decoder.caches.get(
        model.lm.config, 3, 128, model.lm.dtype, "cpu").layers)
    assert decoder.step_shapes == {(3, 128, 128)}
    assert torch.equal(got, _decode(model, GreedyDecoder(kv_bucket=None), batch, 30))
    torch.compiler.reset()
    counters.clear()
    compiled = GreedyDecoder(kv_bucket=64, compile_kwargs={"backend": "eager", "fullgraph": True, "dynamic": False})
    assert torch.equal(_decode(model, compiled, batch, 30), got)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert compiled.eager_reason.startswith("StaticSlidingWindowLayer cache layers")
    short = {k: v[:, 30:] for k, v in batch.items()}  # 10 positions and 12 new tokens: a cache of 64, the window
    assert torch.equal(_decode(model, compiled, short, 12), _decode(model, GreedyDecoder(), short, 12))
    assert counters["stats"]["unique_graphs"] == 1 and compiled.eager_reason is None, dict(counters["stats"])
    torch.compiler.reset()
    assert GreedyDecoder(kv_bucket=0).kv_bucket is None
    with pytest.raises(ValueError, match="kv_bucket must be >= 1"):
        GreedyDecoder(kv_bucket=-64)


def test_one_compilation_serves_every_kv_bucket_batch_size_and_cache_length(models):
    """With dynamic shapes (the default) the step compiles once for batches of 3 and 2 rows, caches of 128 and 64
    positions and the 3 buckets of 16 that 40 new tokens cross, and once more for one-row batches (torch specialises
    a size of 1); none per step, none again when the shapes come back. ``aot_eager`` runs the compiler's
    autograd stage, where a view of the whole cache (contiguous, unlike a view of part of it) once made the last
    bucket compile apart: the cache's spare position is what prevents it."""
    from torch._dynamo.utils import counters

    name, model = models[0][:2]  # llama (the test above compiles phi-2 and codegen)
    three = _long_batch("none")
    batches = {"3x40": three, "2x16": {k: v[1:, 24:] for k, v in three.items()},
               "2x40": {k: v[:2] for k, v in three.items()}, "1x10": {k: v[2:, 30:] for k, v in three.items()}}
    plain = {key: _decode(model, GreedyDecoder(kv_bucket=None), batch, 40) for key, batch in batches.items()}
    torch.compiler.reset()
    counters.clear()
    decoder = GreedyDecoder(kv_bucket=16, compile_kwargs={"backend": "aot_eager", "fullgraph": True, "dynamic": False})
    for key in (*batches, "3x40", "2x16"):
        assert torch.equal(_decode(model, decoder, batches[key], 40), plain[key]), (name, key)
    assert decoder.step_shapes == {(3, 128, 48), (3, 128, 64), (3, 128, 80), (2, 64, 32), (2, 64, 48), (2, 64, 64),
                                   (2, 128, 48), (2, 128, 64), (2, 128, 80), (1, 64, 16), (1, 64, 32), (1, 64, 48),
                                   (1, 64, 64)}
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch.compiler.reset()


def test_the_per_shape_and_whole_cache_decoders_beside_the_default_one(models):
    """In one process (as bench_generate's A/Bs run): the whole-cache decoder (kv_bucket=None) compiles nothing more
    than the default one (its one view is symbolic too), while ``dynamic_shapes=False`` compiles once per batch shape
    and bucket, 3 + 3 here, and is not served by the symbolic graph (which torch would allow for one code object)."""
    from torch._dynamo.utils import counters

    name, model = models[0][:2]
    three = _long_batch("none")
    batches = (three, {k: v[1:, 24:] for k, v in three.items()})
    compiled = {"backend": "eager", "fullgraph": True, "dynamic": False}
    torch.compiler.reset()
    counters.clear()
    tokens = {}
    for label, decoder, graphs in (("default", GreedyDecoder(kv_bucket=16, compile_kwargs=compiled), 1),
                                   ("whole cache", GreedyDecoder(kv_bucket=None, compile_kwargs=compiled), 1),
                                   ("per shape", GreedyDecoder(kv_bucket=16, compile_kwargs=compiled,
                                                               dynamic_shapes=False), 7)):
        tokens[label] = [_decode(model, decoder, batch, 40) for batch in batches]
        assert counters["stats"]["unique_graphs"] == graphs, (label, dict(counters["stats"]))
    assert decoder.step_shapes == {(3, 128, 48), (3, 128, 64), (3, 128, 80), (2, 64, 32), (2, 64, 48), (2, 64, 64)}
    for label in ("whole cache", "per shape"):
        assert all(torch.equal(a, b) for a, b in zip(tokens[label], tokens["default"])), label
    torch.compiler.reset()


def test_more_batch_shapes_than_torchs_default_recompile_limit_all_stay_compiled(models):
    """torch compiles a function for at most 8 shapes by default and runs the rest eager, silently; a run over
    MBPP's test set without dynamic shapes meets more (prompt buckets times the last batch's size). With torch's
    limit set to 2 here (8 shapes would take 8 slow compilations), four shapes: four graphs; with dynamic shapes,
    two (one row, more rows)."""
    from torch._dynamo.utils import counters

    name, model, tok, _ = models[0]
    for dynamic, graphs in ((False, 4), (True, 2)):
        torch.compiler.reset()
        counters.clear()
        decoder = GreedyDecoder(compile_kwargs={"backend": "eager", "fullgraph": True, "dynamic": False},
                                dynamic_shapes=dynamic)
        with torch._dynamo.config.patch(recompile_limit=2):  # (pytest's monkeypatch breaks torch's config module)
            for rows in range(1, 5):
                ids = torch.arange(5, 5 + 4 * rows).view(rows, 4)
                model.decode_greedy(decoder, ids, torch.ones_like(ids), max_new_tokens=2,
                                    criterion=StopOnText(tok, (), [2] * rows))
        assert len(decoder.caches.shapes) == 4, dynamic
        assert counters["stats"]["unique_graphs"] == graphs, (dynamic, dict(counters["stats"]))
    torch.compiler.reset()


def test_sampling_and_logits_processors_are_refused(models, data_paths):
    name, model, tok, enc_tok = models[0]
    task = get_task("mbpp")
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=1)
    batch = Collator(tok.pad_token_id, padding_side="left")(
        list(TaskDataset(task, records, tok, train=False, num_virtual_tokens=0)))
    with pytest.raises(UserError, match="sampling needs --decode_loop hf"):
        generate_batch(model, tok, batch, GenConfig(do_sample=True, temperature=0.5), "cpu", decoder=GreedyDecoder())
    config = model.lm.generation_config
    check_plain_greedy(config)
    config.repetition_penalty = 1.3
    try:
        with pytest.raises(UserError, match="repetition_penalty=1.3; use --decode_loop hf"):
            check_plain_greedy(config)
    finally:
        config.repetition_penalty = 1.0


def test_every_logits_processor_generate_applies_under_greedy_is_refused(models, data_paths):
    """A length penalty in the model's generation config changes generate's greedy picks; the own loop, which takes
    a plain argmax, used to decode on silently with different predictions. Each such setting is refused."""
    import copy

    from transformers import WatermarkingConfig

    name, model, tok, enc_tok = models[0]
    task = get_task("mbpp")
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=2)
    cfg = resolve_gen_config(task, max_new_tokens=8)
    plain = generate_predictions(model, tok, enc_tok, task, records, batch_size=2, gen_config=cfg, progress=False)
    config, saved = model.lm.generation_config, model.lm.generation_config.exponential_decay_length_penalty
    config.exponential_decay_length_penalty = (2, 5.0)
    try:
        penalized = generate_predictions(model, tok, enc_tok, task, records, batch_size=2, gen_config=cfg,
                                         progress=False)
    finally:
        config.exponential_decay_length_penalty = saved
    assert penalized != plain  # generate applies it under greedy decoding
    for field, value in (("exponential_decay_length_penalty", (2, 5.0)), ("guidance_scale", 1.5),
                         ("encoder_repetition_penalty", 1.3), ("remove_invalid_values", True),
                         ("watermarking_config", WatermarkingConfig()), ("min_new_tokens", 3), ("min_length", 40)):
        changed = copy.deepcopy(config)
        setattr(changed, field, value)
        with pytest.raises(UserError, match=f"sets {field}="):
            check_plain_greedy(changed)


def test_a_model_config_asking_for_beams_or_more_sequences_decodes_greedily_in_both_loops(models, data_paths):
    """A model whose own generation config sets num_beams (or num_return_sequences) used to make generate search
    beams and fail on the stop check's row count, where the own loop decoded greedily: both now decode greedily."""
    name, model, tok, enc_tok = models[0]
    task = get_task("mbpp")
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=3)
    cfg = resolve_gen_config(task, max_new_tokens=8)
    want = generate_predictions(model, tok, enc_tok, task, records, batch_size=3, gen_config=cfg, progress=False)
    config = model.lm.generation_config
    saved = config.num_beams, config.num_return_sequences
    config.num_beams, config.num_return_sequences = 2, 2
    try:
        for decoder in (None, GreedyDecoder()):
            assert generate_predictions(model, tok, enc_tok, task, records, batch_size=3, gen_config=cfg,
                                        progress=False, decoder=decoder) == want, decoder
    finally:
        config.num_beams, config.num_return_sequences = saved


@pytest.mark.parametrize("new_tokens", [54, 55, 56, 57])
def test_the_last_new_token_is_exact_when_the_sequence_ends_at_a_cache_boundary(new_tokens):
    """10 prompt tokens + 54..57 new ones: the last token fed back sits at cache positions 62..65, around the
    64-slot boundary of the cache length and of the KV buckets (a cache one slot short wrote the last step into the
    spare slot, outside the view, and its logits moved by ~1e-3)."""
    model, _ = build_model("none", "tiny-llama", seed=5)
    _perturb(model, 11, 0.3)
    model.eval()
    config, saved = model.lm.generation_config, model.lm.generation_config.eos_token_id
    config.eos_token_id = None
    try:
        ids = torch.arange(100, 110).view(1, 10)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        want = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        logits = []
        got = model.decode_greedy(GreedyDecoder(check_every=4), **batch, max_new_tokens=new_tokens,
                                  criterion=StopOnText(None, (), [new_tokens]), logits_out=logits)
    finally:
        config.eos_token_id = saved
    assert torch.equal(got, want.sequences)
    assert torch.allclose(torch.stack(logits, 1), torch.stack(want.logits, 1).float(), rtol=0, atol=1e-5)


def test_an_eos_on_the_budgets_last_step_is_not_part_of_the_completion():
    """Judged every step or every 3: a row whose EOS comes on its last allowed step ends before it, like one whose
    EOS comes earlier (the budget was judged first, and kept the EOS)."""
    tok = load_tokenizer("tiny-llama")
    eos = tok.eos_token_id
    rows = [[101, 102, eos], [101, eos, 103]]
    for every in (1, 3):
        crit = StopOnText(tok, ("\ndef",), [3, 3], [eos])
        if every == 3:
            crit.observe(rows, 0, 0)
        else:
            for n in (1, 2, 3):
                crit.observe([r[:n] for r in rows], 0, n - 1)
        assert crit.lengths == [2, 1], every
        assert crit.trim(torch.tensor(rows)) == [[101, 102], [101]]


def test_decode_greedy_runs_in_eval_mode_and_restores_the_mode():
    """As generate does: a model left in training mode (dropout on) decodes as in eval mode, and stays in training
    mode afterwards."""
    model, _ = build_model("none", "tiny-llama", seed=5)
    _perturb(model, 11, 0.3)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    config, saved = model.lm.generation_config, model.lm.generation_config.eos_token_id
    config.eos_token_id = None
    try:
        batch = _long_batch("none")
        want = _decode(model.eval(), GreedyDecoder(), batch, 12)
        model.train()
        torch.manual_seed(0)
        got = _decode(model, GreedyDecoder(), batch, 12)
    finally:
        config.eos_token_id = saved
    assert model.training and torch.equal(got, want)


def test_auto_picks_the_own_loop_for_fast_greedy_decoding_on_a_gpu_only():
    from transformers import GenerationConfig

    plain, penalized = GenerationConfig(), GenerationConfig(repetition_penalty=1.3)
    gpu = dict(fast=True, device_type="cuda", do_sample=False, generation_config=plain)
    assert own_loop_chosen("auto", **gpu)
    for change in (dict(fast=False), dict(device_type="cpu"), dict(device_type="mps"), dict(device_type="xpu"),
                   dict(do_sample=True), dict(generation_config=penalized)):  # never checked on mps or xpu
        assert not own_loop_chosen("auto", **{**gpu, **change}), change
        assert own_loop_chosen("own", **{**gpu, **change}) and not own_loop_chosen("hf", **gpu)
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        GreedyDecoder(check_every=0)


def test_generate_preds_decodes_with_the_own_loop_for_greedy_fast_decoding_on_a_gpu(data_paths):
    """The CLI's wiring of --decode_loop, --fast_decoding, sampling and the model's generation config (no GPU needed:
    the decoder compiles only when it first decodes). ``(fast decoding, the loop)``."""
    from transformers import GenerationConfig

    from utils.decode_loop import STEP_COMPILE

    def path(*flags, device="cuda", config=GenerationConfig()):
        args = generate_preds.build_parser().parse_args(["--task_name", "mbpp", "--model_type", "tiny-phi-2",
                                                         "--data_path", data_paths["mbpp"], *flags])
        fast, decoder = generate_preds.decoding_path(args, device, generate_preds.check_args(args), config)
        if decoder is None:
            return fast, "generate"
        assert decoder.compile_kwargs in (None, STEP_COMPILE)
        return fast, "own, compiled" if decoder.compile_kwargs else "own, eager"

    assert path() == (True, "own, compiled")  # the default on a GPU
    assert path("--decode_loop", "hf") == (True, "generate")
    assert path("--paper_decoding") == (True, "generate")  # sampling
    assert path(config=GenerationConfig(repetition_penalty=1.2)) == (True, "generate")
    assert path("--fast_decoding", "off") == (False, "generate")
    assert path("--fast_decoding", "off", "--decode_loop", "own") == (False, "own, eager")
    assert path(device="cpu") == (False, "generate")  # the default on a CPU
    assert path("--fast_decoding", "on", device="cpu") == (True, "generate")
    assert path("--fast_decoding", "on", "--decode_loop", "own", device="cpu") == (True, "own, eager")


def test_cli_own_loop_writes_the_files_generate_writes(tmp_path, data_paths, monkeypatch, capsys):
    calls, decode = [], GreedyDecoder.decode
    monkeypatch.setattr(GreedyDecoder, "decode", lambda self, *a, **k: calls.append(1) or decode(self, *a, **k))
    files = {}
    for loop in ("hf", "own", None):  # None: the default, auto, which on a CPU is generate's loop
        log_dir = tmp_path / str(loop)
        calls.clear()
        assert generate_preds.main(["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--peft_method", "none",
                                    "--data_path", data_paths["mbpp"], "--limit", "5", "--batch_size", "2",
                                    "--max_new_tokens", "12", "--no_progress", "--log_dir", str(log_dir),
                                    *(["--decode_loop", loop] if loop else [])]) == 0
        files[loop] = {p.name: p.read_bytes() for p in sorted(log_dir.glob("mbxp*.jsonl"))}
        assert len(calls) == (3 if loop == "own" else 0)  # 5 tasks in batches of 2
    assert files["own"] == files["hf"] == files[None] and len(files["hf"]) == 2
    # sampling is refused before anything in the log dir is touched
    assert _refused_leaving_the_log_dir_as_it_was(
        tmp_path / "own", ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--peft_method", "none",
                           "--data_path", data_paths["mbpp"], "--decode_loop", "own", "--paper_decoding"]) == 2
    assert "--decode_loop own decodes greedily" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["pt", "lopa"])
def test_a_sliding_window_sees_the_soft_prompt_of_a_padded_row_as_of_the_row_alone(method, monkeypatch):
    """A window counts cache slots, not positions: with the soft prompt in front of the left padding, a padded row's
    window lost the prompt 7 and 30 slots early, and its tokens differed from the row's alone (logits by 0.2). The
    prompt now sits after the padding: forward, generate and the own loop give each row what it gets alone."""
    from utils.registry import get_model_spec

    monkeypatch.setitem(get_model_spec("tiny-phi-3").arch, "sliding_window", 32)
    model, _ = build_model(method, "tiny-phi-3", num_virtual_tokens=4, enc_model_type="tiny-roberta", seed=5)
    _perturb(model, 11, 0.3)
    model.eval()
    model.lm.generation_config.eos_token_id = None
    batch = _long_batch(method)
    got, own = model.generate(**batch, max_new_tokens=20, do_sample=False), _decode(model, GreedyDecoder(), batch, 20)
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
    for i, keep in enumerate(batch["attention_mask"].bool()):
        alone = {k: v[i:i + 1, keep] if k in ("input_ids", "attention_mask") else v[i:i + 1] for k, v in batch.items()}
        want = model.generate(**alone, max_new_tokens=20, do_sample=False)[0]
        assert torch.equal(got[i], want) and torch.equal(own[i], want), (method, i)
        with torch.no_grad():
            assert torch.allclose(last[i], model(**alone).logits[0, -1], rtol=0, atol=1e-5), (method, i)
