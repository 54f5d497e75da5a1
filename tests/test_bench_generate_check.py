"""bench_generate's fast-vs-eager diagnosis on constructed decodings: tokens are each path's argmax, as greedy picks."""
import torch

from benchmarks.bench_generate import divergence_report

# One row that agrees at every step; its step-1 difference (0.25) is the noise floor of the cases below.
AGREEING = [[2, 1, 0, 0], [0, 3, 1, 0], [0, 0, 1, 2]]
AGREEING_NOISE = [[0, 0, 0, 0], [0.25, 0, 0, 0], [0, 0, 0.125, 0]]


def _report(eager_rows, noise_rows):
    """Per row: eager logits (T × V) and what the fast path adds; tokens are the argmax of each."""
    eager = torch.tensor(eager_rows, dtype=torch.float32)
    fast = eager + torch.tensor(noise_rows)
    return divergence_report(eager.argmax(-1), fast.argmax(-1), eager, fast)


def test_identical_decodings_report_the_noise_floor_and_no_divergence():
    r = _report([AGREEING], [AGREEING_NOISE])
    assert r == dict(first_divergence=[None], gap_at_divergence=[None], logit_diff_at_divergence=[None],
                     max_logit_diff_before_divergence=0.25, divergences_not_near_ties=0, eager_logit_absmax=3.0,
                     first_step_max_logit_diff=[0.0], first_step_top1_agrees=[True])


def test_a_flip_whose_gap_the_noise_floor_covers_is_a_near_tie():
    # Row 1 parts at step 1 (gap 0.25 = the floor); its step-2 difference comes after the paths parted: not noise.
    flip = [[1, 0, 0, 0], [1, 1.25, 0, 0], [0, 0, 0, 1]]
    flip_noise = [[0.125, 0, 0, 0], [0.5, 0, 0, 0], [0, 7, 0, 0]]
    r = _report([AGREEING, flip], [AGREEING_NOISE, flip_noise])
    assert r["first_divergence"] == [None, 1] and r["gap_at_divergence"] == [None, 0.25]
    assert r["logit_diff_at_divergence"] == [None, 0.5] and r["max_logit_diff_before_divergence"] == 0.25
    assert r["divergences_not_near_ties"] == 0
    assert r["first_step_max_logit_diff"] == [0.0, 0.125] and r["first_step_top1_agrees"] == [True, True]


def test_a_flip_over_a_gap_larger_than_the_noise_floor_is_counted_as_a_suspected_bug():
    # Gap 2 moved by a difference of 3 at step 2: the step's own difference would call it a tie, the floor does not.
    bug = [[1, 0, 0, 0], [0, 1, 0, 0], [3, 1, 0, 0]]
    bug_noise = [[0, 0, 0, 0.125], [0, 0.25, 0, 0], [0, 3, 0, 0]]
    r = _report([AGREEING, bug], [AGREEING_NOISE, bug_noise])
    assert r["first_divergence"] == [None, 2] and r["gap_at_divergence"] == [None, 2.0]
    assert r["logit_diff_at_divergence"] == [None, 3.0] and r["max_logit_diff_before_divergence"] == 0.25
    assert r["divergences_not_near_ties"] == 1 and r["eager_logit_absmax"] == 3.0
    assert r["first_step_max_logit_diff"] == [0.0, 0.125] and r["first_step_top1_agrees"] == [True, True]


def test_paths_that_part_at_the_first_step_everywhere_have_no_floor_and_every_flip_is_suspect():
    """A prompt or soft-prompt bug: the first step already disagrees, in every row."""
    rows = [[[1, 0.5, 0, 0]] * 2, [[0, 0, 2, 1]] * 2]
    r = _report(rows, [[[0, 1, 0, 0]] * 2, [[0, 0, 0, 1.5]] * 2])
    assert r["first_divergence"] == [0, 0] and r["gap_at_divergence"] == [0.5, 1.0]
    assert r["max_logit_diff_before_divergence"] is None and r["divergences_not_near_ties"] == 2
    assert r["first_step_max_logit_diff"] == [1.0, 1.5] and r["first_step_top1_agrees"] == [False, False]
