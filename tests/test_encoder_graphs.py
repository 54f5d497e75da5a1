"""The frozen encoder's CUDA-graph replay (utils/encoder_graphs.py), its plumbing checked on the CPU: a stand-in for
CUDA's capture records the forward and recomputes it in place at each replay, as a graph does. What only a GPU can
show (the capture itself) is checked by bench_train --encoder_graphs, which records the largest difference from the
eager encoder."""
import pytest
import torch

from utils.encoders import load_encoder


class FakeGraph:
    def __init__(self, run):
        self.run, self.replays = run, 0
        self.out = torch.full_like(run(), float("nan"))  # a capture runs nothing: the output is garbage until replayed

    def replay(self):
        self.replays += 1
        self.out.copy_(self.run())


def fake_capture(run, pool):
    graph = FakeGraph(run)
    return graph, graph.out


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    enc = load_encoder("tiny-roberta")[0].eval()
    assert enc.use_graphs(capture=fake_capture, bucket=16, max_width=40)
    return enc


def rows(widths, total, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (len(widths), total), generator=g)
    mask = torch.zeros_like(ids)
    for i, w in enumerate(widths):
        mask[i, :w] = 1
        ids[i, w:] = 1  # RoBERTa's pad
    return ids, mask


def test_replayed_embeddings_are_the_eager_ones_for_every_shape_and_never_alias(encoder):
    """Widths are padded up to the bucket (masked pad tokens), so rows of 9 and 12 tokens share a graph; each call's
    inputs reach the graph, each output is its own (the next replay overwrites the graph's)."""
    calls = [([9, 9, 9], 9, False), ([12, 7, 12], 12, True), ([16, 16, 16], 16, False), ([20, 3, 17], 20, True)]
    outs = []
    for seed, (widths, total, padded) in enumerate(calls):
        ids, mask = rows(widths, total, seed)
        eager = encoder._encode(ids, mask, padded)
        out = encoder(ids, mask, padded)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        outs.append((out, eager))
    for out, eager in outs:  # still the same: nothing later wrote into them
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    keys = sorted(key[:3] for key in encoder.graphs.graphs)
    assert keys == [(3, 16, False), (3, 16, True), (3, 32, True)]
    assert [g.graph.replays for g in encoder.graphs.graphs.values()] == [2, 1, 1]  # 9 and 12 share a graph


def test_a_narrower_batch_after_a_wider_one_in_the_same_bucket_sees_none_of_its_tokens(encoder):
    """Rows of 12 tokens then rows of 9 share the graph of width 16: the second call's columns 9..11 must be masked
    pad tokens again, not the first call's tokens."""
    for widths, total, padded in (([12, 12, 12], 12, False), ([9, 9, 9], 9, False), ([12, 5, 12], 12, True)):
        ids, mask = rows(widths, total, total)
        torch.testing.assert_close(encoder(ids, mask, padded), encoder._encode(ids, mask, padded),
                                   rtol=1e-5, atol=1e-5)
    assert len(encoder.graphs.graphs) == 1


def test_train_mode_and_row_counts_get_their_own_graphs_and_widths_stop_at_the_cap(encoder):
    ids, mask = rows([10, 10], 10, 0)
    encoder(ids, mask, False)
    encoder.train()
    encoder(ids, mask, False)
    encoder(*rows([10], 10, 1), False)
    assert sorted((k[0], k[3]) for k in encoder.graphs.graphs) == [(1, True), (2, False), (2, True)]
    assert [encoder.graphs.width(w) for w in (1, 16, 17, 33, 40, 41)] == [16, 16, 32, 40, 40, 41]


def test_without_the_hosts_padding_flag_the_encoder_runs_eager(encoder):
    ids, mask = rows([5, 8], 8, 0)
    torch.testing.assert_close(encoder(ids, mask), encoder._encode(ids, mask, None))
    assert not encoder.graphs.graphs


def test_backbones_whose_masks_transformers_builds_are_left_eager():
    from tests.test_codesage import CONFIG
    from utils.codesage import CodeSageEncoder
    from utils.encoders import PooledEncoder

    enc = PooledEncoder(CodeSageEncoder(CONFIG), "pooler_l2")
    assert not enc.use_graphs(capture=fake_capture) and enc.graphs is None



def test_lopa_trains_on_replayed_embeddings_as_on_eager_ones(data_paths):
    from custom_peft import build_model
    from utils.batching import Collator, TaskDataset
    from utils.data import load_task_split
    from utils.tasks import get_task

    losses = {}
    for graphs in (False, True):
        torch.manual_seed(0)  # the heads' dropout
        model, tok = build_model("lopa", "tiny-llama", enc_model_type="tiny-roberta", num_virtual_tokens=4, seed=0)
        encoder = model.prompt.encoder
        encoder.dropout_in_training = False
        if graphs:
            assert encoder.use_graphs(capture=fake_capture, bucket=16)
        records = load_task_split("mbpp", "train", data_paths["mbpp"], limit=6)
        dataset = TaskDataset(get_task("mbpp"), records, tok, model.enc_tokenizer, num_virtual_tokens=4)
        collate = Collator(tok.pad_token_id, model.enc_tokenizer.pad_token_id, host_copy=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        losses[graphs] = []
        for start in (0, 2, 4):
            batch = collate(dataset.examples[start:start + 2])
            batch.pop("task_ids")
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[graphs].append(loss.item())
        if graphs:
            assert sum(g.graph.replays for g in encoder.graphs.graphs.values()) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_the_trainer_says_when_it_cannot_use_encoder_graphs(tmp_path, data_paths):
    import json

    from tests.test_training_runs import run_inprocess

    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "lopa", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--enc_model_type", "tiny-roberta", "--data_path", data_paths["mbpp"], "--encoder_graphs",
                           "--limit_train_examples", "2", "--per_gpu_train_batch_size", "2", "--max_train_steps", "1",
                           "--max_length", "64", "--log_dir", str(log_dir)])
    config = json.loads((log_dir / "config.json").read_text())
    assert config["train"]["encoder_graphs"] is True and config["runtime"]["encoder_graphs"] is False
    assert "--encoder_graphs is not used" in (log_dir / "train.log").read_text()


def test_a_failed_capture_leaves_nothing_behind_and_the_next_call_captures_again(encoder):
    calls = []

    def capture_failing_once(run, pool):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("capture failed")
        return fake_capture(run, pool)

    encoder.graphs.capture = capture_failing_once
    ids, mask = rows([7, 9], 9, 0)
    with pytest.raises(RuntimeError, match="capture failed"):
        encoder(ids, mask, True)
    assert not encoder.graphs.graphs
    torch.testing.assert_close(encoder(ids, mask, True), encoder._encode(ids, mask, True), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 and len(encoder.graphs.graphs) == 1
