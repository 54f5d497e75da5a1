import json
import pathlib

import pytest
import torch

from tests.conftest import require_real_data
from utils.batching import IGNORE_INDEX, Collator, LengthGroupedSampler, TaskDataset, encode_example
from utils.data import load_task_split, read_jsonl
from utils.errors import UserError
from utils.models import load_tokenizer, tiny_tokenizer
from utils.tasks import get_task

CRUX = ("cruxeval_input_prediction", "cruxeval_output_prediction")


def _path(data_paths, task):
    return data_paths["mbpp" if task == "mbpp" else "cruxeval"]


def test_paper_splits_hold_487_and_400(data_paths):
    require_real_data(data_paths)
    train = load_task_split("mbpp", "train", data_paths["mbpp"])
    test = load_task_split("mbpp", "test", data_paths["mbpp"])
    assert (len(train), len(test)) == (487, 487)
    assert (train[0]["task_id"], train[-1]["task_id"], test[0]["task_id"], test[-1]["task_id"]) == (
        "MBPP/1", "MBPP/487", "MBPP/488", "MBPP/974")
    std = load_task_split("mbpp", "test", data_paths["mbpp"], mbpp_split="standard")
    assert len(std) == 500 and std[0]["task_id"] == "MBPP/11"
    for task in CRUX:
        tr, te = load_task_split(task, "train", data_paths["cruxeval"]), load_task_split(task, "test",
                                                                                         data_paths["cruxeval"])
        assert (len(tr), len(te)) == (400, 400)
        assert (tr[0]["id"], te[0]["id"], te[-1]["id"]) == ("sample_0", "sample_400", "sample_799")


@pytest.mark.parametrize("task_name", ("mbpp",) + CRUX)
@pytest.mark.parametrize("model_type", ["tiny-phi-2", "tiny-llama"])
def test_training_input_is_prompt_plus_target_and_labels_cover_the_target(data_paths, task_name, model_type):
    task, tok = get_task(task_name), load_tokenizer(model_type)
    records = load_task_split(task_name, "train", _path(data_paths, task_name), limit=20)
    for record in records:
        ex = encode_example(task, record, tok, num_virtual_tokens=10)
        max_prompt, max_total = task.max_lengths(10)
        assert len(ex["input_ids"]) <= max_total
        text = tok.decode(ex["input_ids"], skip_special_tokens=True)
        prompt, target = task.prompt(record), task.target(record)
        if len(tok(prompt)["input_ids"]) <= max_prompt and len(ex["input_ids"]) < max_total:
            assert text == prompt + target
        supervised = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
        assert [lab for lab in ex["labels"] if lab != IGNORE_INDEX] == supervised
        target_ids = tok(target, add_special_tokens=False)["input_ids"]
        if task.is_mbpp:
            assert supervised == (target_ids + [tok.eos_token_id])[:len(supervised)]
            assert ex["labels"][-1] == tok.eos_token_id or len(ex["input_ids"]) == max_total
        else:  # CRUXEval does not supervise the EOS
            assert supervised == target_ids and ex["input_ids"][-1] == tok.eos_token_id
            assert ex["input_ids"][0] == tok.bos_token_id


CRUX_SHOTS = {  # spec §4.2: CRUXEval's own two direct examples per mode, blank-line separated
    "output": ('[PYTHON]\ndef f(n):\n    return n\nassert f(17) == ??\n[/PYTHON]\n[ANSWER]\nassert f(17) == 17\n'
               '[/ANSWER]\n\n[PYTHON]\ndef f(s):\n    return s + "a"\nassert f("x9j") == ??\n[/PYTHON]\n[ANSWER]\n'
               'assert f("x9j") == "x9ja"\n[/ANSWER]\n\n'),
    "input": ('[PYTHON]\ndef f(my_list):\n    count = 0\n    for i in my_list:\n        if len(i) % 2 == 0:\n'
              '            count += 1\n    return count\nassert f(??) == 3\n[/PYTHON]\n[ANSWER]\n'
              'assert f(["mq", "px", "zy"]) == 3\n[/ANSWER]\n\n[PYTHON]\ndef f(s1, s2):\n    return s1 + s2\n'
              'assert f(??) == "banana"\n[/PYTHON]\n[ANSWER]\nassert f("ba", "nana") == "banana"\n[/ANSWER]\n\n'),
}


@pytest.mark.parametrize("mode", ["input", "output"])
def test_cruxeval_prompt_is_instruction_two_shots_then_the_query_up_to_answer(mode):
    task = get_task(f"cruxeval_{mode}_prediction")
    record = {"id": "sample_0", "code": "def f(x):\n    return x * 2", "input": "3", "output": "6"}
    query = "assert f(3) == ??" if mode == "output" else "assert f(??) == 6"
    instruction, rest = task.prompt(record).split("\n\n", 1)
    assert instruction.endswith("as in these examples.") and "[PYTHON]" not in instruction
    assert rest == CRUX_SHOTS[mode] + f"[PYTHON]\ndef f(x):\n    return x * 2\n{query}\n[/PYTHON]\n[ANSWER]"
    assert task.target(record) == "\nassert f(3) == 6\n[/ANSWER]\n"  # the same answer line in both modes

def test_long_prompts_are_cut_from_the_left(caplog):
    task, tok = get_task("mbpp"), tiny_tokenizer()
    record = {"task_id": "MBPP/1", "prompt": "x = 1\n" * 400 + "def tail():\n", "canonical_solution": "  pass",
              "entry_point": "tail", "test": ""}
    with caplog.at_level("WARNING"):
        ex = encode_example(task, record, tok, tiny_tokenizer("roberta"), num_virtual_tokens=10, train=True)
    assert "indexing errors" not in caplog.text  # no false alarm: the text is cut to the limits below
    ex = encode_example(task, record, tok, num_virtual_tokens=10, train=False)
    assert len(ex["input_ids"]) == 315
    assert tok.decode(ex["input_ids"]).endswith("def tail():\n")


@pytest.mark.parametrize("enc_kind", ["roberta", "decoder"])
def test_encoder_input_keeps_the_prompt_budget_mbpp_and_512_cruxeval(enc_kind):
    """As the original: MBPP's encoder input is cut to the FM's prompt budget (325 - m), CRUXEval's to 512; both
    keep the end of the prompt, CLS/SEP included in the budget when the tokenizer has them."""
    tok = tiny_tokenizer()
    enc_tok = tiny_tokenizer("roberta") if enc_kind == "roberta" else tiny_tokenizer()
    body = enc_tok("x = 1\n" * 400 + "def tail():\n", add_special_tokens=False)["input_ids"]
    wrap = enc_kind == "roberta"
    mbpp = {"task_id": "MBPP/1", "prompt": "x = 1\n" * 400 + "def tail():\n", "canonical_solution": "  pass",
            "entry_point": "tail", "test": ""}
    for m, budget in ((10, 315), (4, 321)):
        ids = encode_example(get_task("mbpp"), mbpp, tok, enc_tok, num_virtual_tokens=m, train=False)["enc_input_ids"]
        kept = budget - 2 if wrap else budget
        assert ids == ([enc_tok.cls_token_id] + body[-kept:] + [enc_tok.sep_token_id] if wrap else body[-kept:])
    task = get_task("cruxeval_output_prediction")
    crux = {"id": "sample_0", "code": "def f(x):\n" + "    x = x + 1\n" * 300 + "    return x", "input": "3",
            "output": "304"}
    ids = encode_example(task, crux, tok, enc_tok, num_virtual_tokens=10, train=False)["enc_input_ids"]
    full = enc_tok(task.prompt(crux), add_special_tokens=False)["input_ids"]
    assert len(full) > 600 and len(ids) == 512
    assert ids[1:-1] == full[-510:] if wrap else ids == full[-512:]



def test_mbpp_prompt_budgets_of_a_few_tokens_hold_and_none_is_refused():
    """m close to 325 leaves MBPP a prompt budget of 325 - m tokens: a budget of 1-2 tokens must still cut
    (``ids[-0:]`` would keep everything), and none at all is an argument error, before anything loads."""
    from utils.train_args import build_parser, config_from_namespace

    tok, roberta, decoder = tiny_tokenizer(), tiny_tokenizer("roberta"), tiny_tokenizer()
    record = {"task_id": "MBPP/1", "prompt": "x = 1\n" * 40 + "def tail():\n", "canonical_solution": "  pass",
              "entry_point": "tail", "test": ""}
    body = decoder(record["prompt"], add_special_tokens=False)["input_ids"]
    for m, budget in ((323, 2), (324, 1)):
        ex = encode_example(get_task("mbpp"), record, tok, roberta, num_virtual_tokens=m, train=False)
        assert len(ex["input_ids"]) == budget
        assert ex["enc_input_ids"] == [roberta.cls_token_id, roberta.sep_token_id]  # no room left inside CLS/SEP
        ex = encode_example(get_task("mbpp"), record, tok, decoder, num_virtual_tokens=m, train=False)
        assert ex["enc_input_ids"] == body[-budget:]
    short = encode_example(get_task("mbpp"), record, tok, roberta, num_virtual_tokens=10, train=False)
    assert short["enc_input_ids"][1:-1] == roberta(record["prompt"], add_special_tokens=False)["input_ids"]  # whole
    with pytest.raises(UserError, match="--num_virtual_tokens 325: MBPP's prompt budget .* leaves none"):
        encode_example(get_task("mbpp"), record, tok, num_virtual_tokens=325, train=False)
    argv = ["--peft_method", "lopa", "--task_name", "mbpp", "--model_type", "tiny-llama", "--num_virtual_tokens", "400"]
    with pytest.raises(UserError, match="--num_virtual_tokens 400"):
        config_from_namespace(build_parser("peft").parse_args(argv), "peft")
    argv[1] = "lora"  # m is not used by lora: no error
    assert config_from_namespace(build_parser("peft").parse_args(argv), "peft").model.num_virtual_tokens == 400

def test_dynamic_padding_never_pads_past_the_longest_row(data_paths):
    tok, enc_tok = tiny_tokenizer(), tiny_tokenizer("roberta")
    task = get_task("mbpp")
    ds = TaskDataset(task, load_task_split("mbpp", "train", data_paths["mbpp"], limit=16), tok, enc_tok,
                     num_virtual_tokens=10)
    for side in ("left", "right"):
        for start in range(0, len(ds), 4):
            rows = [ds[i] for i in range(start, min(start + 4, len(ds)))]
            batch = Collator(tok.pad_token_id, enc_tok.pad_token_id, padding_side=side)(rows)
            assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)
            assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
            assert batch["enc_input_ids"].shape[1] == max(len(r["enc_input_ids"]) for r in rows)
            assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
            edge = batch["attention_mask"][:, 0 if side == "right" else -1]
            assert edge.all()  # padding only on the chosen side
    fixed = Collator(tok.pad_token_id, enc_tok.pad_token_id, pad_to=571)([ds[0], ds[1]])
    assert fixed["input_ids"].shape == (2, 571)


def test_encoder_inputs_use_the_encoder_tokenizer(data_paths):
    tok, enc_tok = tiny_tokenizer(), tiny_tokenizer("roberta")
    task = get_task("cruxeval_output_prediction")
    record = load_task_split(task.name, "test", data_paths["cruxeval"], limit=1)[0]
    ex = encode_example(task, record, tok, enc_tok, train=False)
    assert ex["enc_input_ids"][0] == enc_tok.cls_token_id and ex["enc_input_ids"][-1] == enc_tok.sep_token_id
    assert len(ex["enc_input_ids"]) <= 512
    assert enc_tok.decode(ex["enc_input_ids"][1:-1]) in task.prompt(record)


def test_length_grouped_sampler_is_a_deterministic_permutation():
    lengths = [5, 50, 7, 300, 12, 80, 3, 44, 9, 120] * 3
    s = LengthGroupedSampler(lengths, batch_size=2, seed=1, group=3)
    first = list(s)
    assert sorted(first) == list(range(len(lengths))) and first == list(s)
    s.set_epoch(1)
    assert list(s) != first
    # batches cut from the order are the length-sorted groups: little padding, the short one last
    s = LengthGroupedSampler(lengths, batch_size=4, seed=3, group=2)
    order = list(s)
    batches = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert [len(b) for b in batches] == [4] * 7 + [2]
    padded = sum(4 * max(lengths[i] for i in b) for b in batches[:-1])
    plain = sum(4 * max(lengths[i] for i in order_b) for order_b in
                [list(range(len(lengths)))[i:i + 4] for i in range(0, 28, 4)])
    assert padded < plain


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "MBPP/1"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON \(.*, column 2\)"):
        read_jsonl(path)
    path.write_text('{"prompt": "a\tb"}\n')  # a raw tab inside a string: json's message ends in "at"
    with pytest.raises(UserError, match=r"bad\.jsonl:1: not valid JSON \(Invalid control character, column 14\)"):
        read_jsonl(path)


def test_missing_field_and_empty_split_are_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"task_id": "MBPP/1", "prompt": "p", "canonical_solution": "s",
                                "entry_point": "f"}) + "\n")
    with pytest.raises(UserError, match=r"m\.jsonl:1: record is missing field 'test'"):
        load_task_split("mbpp", "train", str(path))
    path.write_text(json.dumps({"task_id": "MBPP/1", "prompt": "p", "canonical_solution": "s", "entry_point": "f",
                                "test": "t"}) + "\n")
    with pytest.raises(UserError, match="test split is empty"):
        load_task_split("mbpp", "test", str(path))
    with pytest.raises(UserError, match="unknown task 'humaneval'"):
        load_task_split("humaneval", "test", str(path))


def test_a_partial_split_is_named_once(tmp_path, capsys):
    """A cut data file (the first 500 lines of MBPP) scored 13 tasks as if they were the test split, silently."""
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(json.dumps({"id": f"sample_{i}", "code": "def f(x):\n    return x", "input": "1",
                                        "output": "1"}) + "\n" for i in range(395, 410)))
    assert len(load_task_split("cruxeval_output_prediction", "test", str(path))) == 10
    assert capsys.readouterr().err == (f"warning: {path}: the test split has 10 of its 400 ids (400-799); a partial "
                                       f"file trains on, or scores, only those\n")
    load_task_split("cruxeval_output_prediction", "test", str(path), limit=3)
    assert capsys.readouterr().err == ""  # said once


def test_a_record_id_twice_is_named_before_generation_keys_predictions_by_it(tmp_path):
    record = {"id": "sample_401", "code": "def f(x):\n    return x", "input": "1", "output": "1"}
    path = tmp_path / "crux.jsonl"
    path.write_text("".join(json.dumps({**record, "id": i}) + "\n" for i in ("sample_400", "sample_401", "sample_7")))
    assert [r["id"] for r in load_task_split("cruxeval_input_prediction", "test", str(path))] == ["sample_400",
                                                                                                  "sample_401"]
    with path.open("a") as fh:  # say a copy of the test file appended to the whole one
        fh.write(json.dumps(record) + "\n")
    for split in ("train", "test"):
        with pytest.raises(UserError, match=r"crux\.jsonl: id 'sample_401' appears more than once"):
            load_task_split("cruxeval_input_prediction", split, str(path))


def test_the_other_tasks_file_names_the_fields_and_the_fix(data_paths):
    with pytest.raises(UserError) as err:
        load_task_split("mbpp", "train", data_paths["cruxeval"])
    assert str(err.value).startswith(f"{data_paths['cruxeval']}:1: record is missing field 'task_id'; ")
    assert "task_id, prompt, canonical_solution, entry_point, test; pass that file as --data_path" in str(err.value)
    with pytest.raises(UserError, match="needs the CRUXEval JSONL, one record per line with fields id, code"):
        load_task_split("cruxeval_output_prediction", "test", data_paths["mbpp"])


def test_fixture_data_splits_are_non_empty(tmp_path):
    from utils.fixtures import write_fixture_data

    paths = write_fixture_data(tmp_path)
    assert len(load_task_split("mbpp", "test", paths["mbpp"])) == 10
    assert len(load_task_split("cruxeval_output_prediction", "train", paths["cruxeval"])) == 10


def test_the_public_mbpp_file_is_fetched_once_into_the_cache_and_then_read_offline(tmp_path, monkeypatch):
    """No --data_path and no ../shared/data: MBPP comes from its GitHub URL. Through `datasets` that failed with an
    ImportError (its https path needs aiohttp, which nothing installs) before any download was tried."""
    import io
    import urllib.request

    from datasets import config

    from utils import data
    from utils.fixtures import write_fixture_data

    body = pathlib.Path(write_fixture_data(tmp_path / "src")["mbpp"]).read_bytes()
    fetched = []

    def fake_urlopen(url, timeout=None):
        fetched.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", False)
    with pytest.warns(UserWarning, match="not the file the paper's splits were checked on"):
        records = data.load_records("mbpp")
    assert fetched == [data.MBPP_SOURCE_URL] and len(records) == len(body.splitlines()) == 20
    test_ids = [r["task_id"] for r in load_task_split("mbpp", "test")]
    assert test_ids == [r["task_id"] for r in records if int(r["task_id"].split("/")[1]) >= 488] and len(test_ids) == 10
    monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", True)  # the cached copy needs no network
    assert data.load_records("mbpp") == records and len(fetched) == 1
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="HF_DATASETS_OFFLINE.*pass --data_path"):
        data.load_records("mbpp")


def test_the_public_mbpp_file_as_checked_downloads_without_a_warning(tmp_path, monkeypatch, data_paths):
    import io
    import urllib.request
    import warnings

    from datasets import config

    from utils import data

    require_real_data(data_paths)
    body = pathlib.Path(data_paths["mbpp"]).read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(body))
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(data.load_records("mbpp")) == 974


def test_non_utf8_bytes_and_wrong_field_types_are_named(tmp_path):
    """Undecodable bytes were a UnicodeDecodeError traceback; a list 'test' or a null 'prompt' passed the reader
    and failed later as a TypeError in the evaluator (or was blamed on generate_preds' own output file)."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"task_id": "MBPP/1"}\n{"task_id": "\xff"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not UTF-8 text \(byte 0xff at column 14\); save it as UTF-8"):
        read_jsonl(path)
    path.write_text(json.dumps({"task_id": "MBPP/1", "test": ["assert 1"]}) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl:1: field 'test' must be a string, got list; fix"):
        read_jsonl(path, ("task_id", "test"), "fix it")
    with pytest.raises(UserError, match=f"{tmp_path}: is a directory, not a file; pass the file's path"):
        read_jsonl(tmp_path)


def test_cruxeval_bos_appears_once_for_a_tokenizer_that_adds_it(data_paths):
    """CRUXEval forces a BOS first: not a second one where the tokenizer (Llama's, DeepSeek's) adds its own."""
    from utils.batching import encode_example
    from utils.data import load_task_split
    from utils.models import load_tokenizer
    from utils.tasks import get_task
    task, tok = get_task("cruxeval_output_prediction"), load_tokenizer("tiny-llama")
    rec = load_task_split(task.name, "train", data_paths["cruxeval"], limit=1)[0]
    for train in (True, False):
        ids = encode_example(task, rec, tok, train=train)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_an_over_long_cruxeval_example_keeps_its_whole_answer_and_eos():
    """CRUXEval keeps the right end of a row over 512 tokens: the answer and EOS, not the start of the code."""
    from utils.batching import IGNORE_INDEX, encode_example
    from utils.models import load_tokenizer
    from utils.tasks import get_task
    task, tok = get_task("cruxeval_output_prediction"), load_tokenizer("tiny-phi-2")
    rec = {"id": "sample_1", "code": "def f(x):\n" + "    x = x + 1\n" * 300 + "    return x",
           "input": "1", "output": "301"}
    ex = encode_example(task, rec, tok)
    assert len(ex["input_ids"]) == 512 and ex["input_ids"][-1] == tok.eos_token_id
    supervised = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    assert supervised == tok(task.target(rec), add_special_tokens=False)["input_ids"]


def test_length_grouped_batches_are_not_longest_first():
    from utils.batching import LengthGroupedSampler
    """The sampler's batches within a mega-batch are shuffled, "so long rows do not all come first"."""
    lengths = list(range(400))
    for seed in range(5):
        order = list(LengthGroupedSampler(lengths, batch_size=4, seed=seed, group=50))
        batches = [order[i:i + 4] for i in range(0, 400, 4)]
        means = [sum(lengths[i] for i in b) for b in batches[:50]]
        assert means != sorted(means, reverse=True)  # batches of a mega-batch are shuffled, not longest first


def test_the_collators_host_copy_tells_the_encoder_whether_its_rows_are_padded():
    """On a GPU the forward trusts ``batch["host"]`` (only shapes are compared there): its ``enc_padded`` flag decides
    whether the frozen encoder masks padding at all. A wrong flag gives other instance prompts for padded rows (on
    the CPU ``HostCopy.matches`` catches it and falls back, so the flag itself has to be right)."""
    from custom_peft import build_model

    model, tok = build_model("lopa", "tiny-llama", num_virtual_tokens=4, lp_rank=2, enc_model_type="tiny-roberta",
                             seed=3)
    model.eval()
    enc_tok = tiny_tokenizer("roberta")
    collate = Collator(tok.pad_token_id, enc_tok.pad_token_id, host_copy=True)
    for texts, padded in ((["def f(x):\n    return x * 2", "import os"], True), (["a = 1", "b = 2"], False)):
        examples = [{"task_id": str(i), "input_ids": tok(t)["input_ids"] + [tok.eos_token_id],
                     "labels": [IGNORE_INDEX] * len(tok(t)["input_ids"]) + [tok.eos_token_id],
                     "enc_input_ids": enc_tok(t)["input_ids"]} for i, t in enumerate(texts)]
        batch = collate(examples)
        enc_ids, enc_mask = batch["enc_input_ids"], batch["enc_attention_mask"]
        assert bool((enc_mask == 0).any()) == padded and batch["host"].enc_padded is padded
        assert batch["host"].matches(batch["attention_mask"].to("meta"), batch["labels"].to("meta"))  # trusted there
        with torch.no_grad():
            told = model.prompt(enc_ids, enc_mask, batch["host"].enc_padded)
            assert torch.equal(told, model.prompt(enc_ids, enc_mask))


def test_pad_to_multiple_of_rounds_up_only_past_a_multiple():
    """Buckets of ``pad_to_multiple_of`` (static caches, compiled shapes): a longest row already on a multiple is not
    padded a further bucket (wasted positions in every decoding step)."""
    collate = Collator(0, padding_side="left", pad_to_multiple_of=8)
    rows = lambda *lengths: [{"task_id": str(n), "input_ids": [5] * n} for n in lengths]  # noqa: E731
    assert [collate(rows(*ls))["input_ids"].shape[1] for ls in ((8, 3), (9, 2), (1,), (16,))] == [8, 16, 8, 16]
    batch = collate(rows(8, 3))
    assert batch["attention_mask"].sum(1).tolist() == [8, 3] and batch["attention_mask"][:, -1].all()
    # with m = 3 virtual tokens before each row, m + the row is rounded: the decoder's width is the multiple
    prefixed = Collator(0, pad_to_multiple_of=8, prefix_tokens=3)
    assert [prefixed(rows(*ls))["input_ids"].shape[1] for ls in ((5, 3), (6, 2), (1,), (13,))] == [5, 13, 5, 13]
    assert Collator(0, pad_to=20, pad_to_multiple_of=8, prefix_tokens=3)(rows(6))["input_ids"].shape[1] == 20


def test_a_shuffled_file_gives_the_split_in_id_order_and_limit_takes_the_lowest_ids(tmp_path, capsys):
    """--limit and the files' order go by task number, not by the file's line order (or the ids as strings)."""
    path = tmp_path / "shuffled.jsonl"
    path.write_text("".join(json.dumps({"task_id": f"MBPP/{i}", "prompt": "p", "canonical_solution": "s",
                                        "entry_point": "f", "test": "t"}) + "\n" for i in (100, 12, 510, 11, 9, 511)))
    assert [r["task_id"] for r in load_task_split("mbpp", "test", str(path), mbpp_split="standard")] == [
        "MBPP/11", "MBPP/12", "MBPP/100", "MBPP/510"]
    assert [r["task_id"] for r in load_task_split("mbpp", "test", str(path), mbpp_split="standard", limit=2)] == [
        "MBPP/11", "MBPP/12"]
    with pytest.raises(UserError, match=r"id '400' is not of the form sample_<n>"):
        path.write_text(json.dumps({"id": "400", "code": "", "input": "", "output": ""}) + "\n")
        load_task_split("cruxeval_input_prediction", "test", str(path))


def _crux_lines(numbers) -> str:
    return "".join(json.dumps({"id": f"sample_{i}", "code": "def f(x):\n    return x", "input": "1", "output": "1"})
                   + "\n" for i in numbers)


def test_the_standard_mbpp_split_trains_on_601_to_974(data_paths):
    """A model trained with --mbpp_split standard must see exactly the tasks its generation refuses to score."""
    require_real_data(data_paths)
    train = load_task_split("mbpp", "train", data_paths["mbpp"], mbpp_split="standard")
    assert (len(train), train[0]["task_id"], train[-1]["task_id"]) == (374, "MBPP/601", "MBPP/974")


@pytest.mark.parametrize("task_name, bad_id", [("mbpp", "MBPP/12a"), ("cruxeval_output_prediction", "sample_400 b")])
def test_an_id_with_anything_after_its_number_is_refused_not_read_as_that_number(task_name, bad_id, tmp_path):
    path = tmp_path / "d.jsonl"
    record = ({"task_id": bad_id, "prompt": "p", "canonical_solution": "s", "entry_point": "f", "test": "t"}
              if task_name == "mbpp" else {"id": bad_id, "code": "", "input": "", "output": ""})
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"id '{bad_id}' is not of the form"):
        load_task_split(task_name, "test", str(path))


def test_a_whole_split_gives_no_partial_file_warning(tmp_path, capsys):
    path = tmp_path / "whole.jsonl"
    path.write_text(_crux_lines(range(800)))
    assert len(load_task_split("cruxeval_output_prediction", "test", str(path))) == 400
    assert capsys.readouterr().err == ""


def test_blank_lines_in_a_data_file_are_skipped(tmp_path):
    """An editor's trailing empty line, or one between records, is no record (and no JSON error)."""
    path = tmp_path / "blank.jsonl"
    lines = _crux_lines((400, 401)).splitlines(keepends=True)
    path.write_text("\n" + lines[0] + "  \n\n" + lines[1] + "\n")
    assert [r["id"] for r in load_task_split("cruxeval_output_prediction", "test", str(path))] == ["sample_400",
                                                                                                   "sample_401"]


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ("400", "int"), ('"sample_400"', "str")])
def test_a_line_that_is_not_a_json_object_is_named(line, kind, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(_crux_lines((400,)) + line + "\n")
    with pytest.raises(UserError,
                       match=rf"d\.jsonl:2: expected a JSON object, got {kind}; the task cruxeval_output_prediction"):
        load_task_split("cruxeval_output_prediction", "test", str(path))
    with pytest.raises(UserError, match=rf"d\.jsonl:2: expected a JSON object, got {kind}$"):
        read_jsonl(path)


def test_the_train_data_digest_changes_with_any_record_but_not_with_key_order():
    """A resumed training refuses a --data_path whose train split differs from the one it began on."""
    from utils.data import records_digest

    records = [{"id": f"sample_{i}", "code": "c", "input": "1", "output": "1"} for i in range(3)]
    digest = records_digest(records)
    assert records_digest([dict(reversed(list(r.items()))) for r in records]) == digest
    for i in range(3):
        changed = [dict(r) for r in records]
        changed[i]["output"] = "2"
        assert records_digest(changed) != digest
    assert records_digest(records[:2]) != digest
