"""gpt2/recall.py: the recall tasks, their accuracy metric, and gpt2/stats.py."""

import json
import math
import random

import pytest
import torch

from conftest import tiny_args
from gpt2.recall import FIRST_CONTENT, SEP, TASKS, RecallData, answer_accuracy
from gpt2.stats import mean_sd, paired_difference, verdict
from gpt2.train import train

T = 64


def data(dataset="recall", **kw):
    settings = dict(n_content=16, segment=12, gap=3, pairs=6, queries=4)
    return RecallData(dataset, **{**settings, **kw})


def test_batches_are_a_function_of_seed_split_step_and_micro_batch():
    d = data()
    a = d.get_batch_with_distance("train", 4, T, 1, 5, 2)
    b = d.get_batch_with_distance("train", 4, T, 1, 5, 2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    for other in (("val", 1, 5, 2), ("train", 2, 5, 2), ("train", 1, 6, 2), ("train", 1, 5, 3)):
        c = d.get_batch_with_distance(other[0], 4, T, *other[1:])
        assert not torch.equal(a[0], c[0]), other
    x, y = d.get_batch("train", 4, T, 1, 5, 2)
    assert torch.equal(x, a[0]) and torch.equal(y, a[1])


def test_every_answer_lies_earlier_at_its_distance_and_the_rest_is_masked():
    d = data()
    for step in range(5):
        x, y, dist, task = d.get_batch_with_distance("train", 6, T, 0, step, 0)
        answers = y >= 0
        rows, pos = answers.nonzero(as_tuple=True)
        assert (dist[rows, pos] >= 1).all()
        assert torch.equal(x[rows, pos - dist[rows, pos]], y[rows, pos])  # the answer's token, that far back
        assert (dist[~answers] == 0).all()
        per_row = answers.sum(1)
        for r in range(6):
            assert per_row[r] == (d.segment if TASKS[task[r]] == "copy" else d.queries)
            if TASKS[task[r]] == "copy":
                assert (dist[r][answers[r]] == d.segment + d.gap).all()
                assert x[r, d.segment + d.gap] == SEP
            else:  # queries ask distinct keys, and answers are values
                keys = x[r][answers[r]]
                assert len(set(keys.tolist())) == d.queries and (keys < FIRST_CONTENT + 8).all()
                assert (y[r][answers[r]] >= FIRST_CONTENT + 8).all()
    assert set(task.tolist()) == {0, 1}  # recall = both tasks


def test_train_and_val_never_share_a_sequence():
    d = data(n_content=4, segment=3, pairs=2, queries=1)  # a small space, so collisions would show
    seen = {}
    for split in ("train", "val"):
        seen[split] = {tuple(row.tolist()) for step in range(40)
                       for row in d.get_batch_with_distance(split, 8, 16, 0, step, 0)[0]}
    assert len(seen["train"]) > 20 and len(seen["val"]) > 20
    assert not seen["train"] & seen["val"]


def test_bad_settings_are_listed_together():
    problems = data("recall", n_content=2, segment=40, pairs=9, queries=0, gap=-1).problems(64)
    assert problems == ["--recall-vocab must be >= 4, got 2", "--recall-gap must be >= 0, got -1",
                        "copy needs 2 x --recall-segment + --recall-gap = 79 <= block_size 64",
                        "--recall-queries must be >= 1, got 0",
                        "--recall-pairs 9 exceeds the 1 keys of --recall-vocab"]
    with pytest.raises(ValueError, match="unknown recall dataset 'nope'"):
        RecallData("nope")
    with pytest.raises(ValueError, match="mqar needs 2 x --recall-pairs"):
        data("mqar", pairs=6, queries=6).check_block_size(16)


def test_answer_accuracy_counts_near_far_and_per_task():
    y = torch.tensor([[-1, 5, 6, -1], [7, -1, 8, 9]])
    dist = torch.tensor([[0, 2, 10, 0], [1, 0, 12, 20]])
    task = torch.tensor([0, 1])
    logits = torch.zeros(2, 4, 12)
    for (r, p), target in {(0, 1): 5, (0, 2): 3, (1, 0): 7, (1, 2): 8, (1, 3): 1}.items():
        logits[r, p, target] = 1.0
    acc = answer_accuracy(logits, y, dist, task, window=8)
    assert acc["acc"] == (3, 5) and acc["acc_near"] == (2, 2) and acc["acc_far"] == (1, 3)
    assert acc["acc_copy"] == (1, 2) and acc["acc_copy_far"] == (0, 1)
    assert acc["acc_mqar"] == (2, 3) and acc["acc_mqar_far"] == (1, 2)


def test_paired_statistics_recover_a_known_difference():
    rng = random.Random(0)
    base = [rng.gauss(3.0, 0.5) for _ in range(400)]  # batches differ a lot ...
    shifted = [b + 0.02 + rng.gauss(0, 0.01) for b in base]  # ... the method shifts each a little
    diff, se = paired_difference(shifted, base)
    assert diff == pytest.approx(0.02, abs=3 * 0.01 / 20)
    assert se == pytest.approx(0.01 / math.sqrt(400), rel=0.15)
    assert verdict(diff, se, "worse", "better") == "worse"
    assert verdict(0.001, 0.001) == "within noise" and verdict(-0.01, 0.001) == "lower"
    assert verdict(5e-7, 0.0) == "within noise"  # below float32 rounding of a mean loss
    assert paired_difference([1.0], [0.5]) == (0.5, None) and verdict(0.5, None) == "within noise"
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])


def test_training_on_recall_logs_accuracy_everywhere(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(tiny_args(tmp_path / "unused", run, "--dataset", "recall", "--recall-vocab", "16",
                              "--recall-segment", "8", "--recall-pairs", "4", "--recall-queries", "4",
                              "--kv-prune-recency", "10", "--max-iters", "10", "--sample-tokens", "5"))
    out = capsys.readouterr().out
    assert "eval  10: train loss" in out and ", acc " in out and "; copy " in out and "; mqar " in out
    assert "final val acc" in out and "== sample ==" not in out
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_acc" in line]
    assert [e["iter"] for e in evals] == [10]
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("val_acc", "val_acc_near", "val_acc_far", "val_acc_copy", "val_acc_mqar", "val_acc_mqar_far"):
        assert 0.0 <= on_disk[key] <= 1.0 and on_disk[key] == summary[key]
    assert on_disk["val_acc_copy_far"] is None  # copy's answers lie 8 back, inside the window of 10
    assert on_disk["recall_tasks"] == ["copy", "mqar"] and on_disk["chance_loss"] > 0


@pytest.mark.parametrize("pair_tokens", [1, 2])
def test_mqar_layouts_keep_the_answer_in_the_value_token(pair_tokens):
    d = data("mqar", pairs=6, queries=20, pair_tokens=pair_tokens)  # more queries than pairs: repeats
    x, y, dist, _ = d.get_batch_with_distance("val", 4, T, 3, 1, 0)
    answers = y >= 0
    assert (answers.sum(1) == 20).all()
    rows, pos = answers.nonzero(as_tuple=True)
    source = x[rows, pos - dist[rows, pos]]
    if pair_tokens == 2:
        assert torch.equal(source, y[rows, pos])
        assert d.vocab_size == FIRST_CONTENT + 16
    else:  # the fused token encodes (key, value): its value part is the answer, its key part the query
        half = 8
        fused = source - FIRST_CONTENT - 16
        assert d.vocab_size == FIRST_CONTENT + 16 + half * half
        assert torch.equal(fused % half + FIRST_CONTENT + half, y[rows, pos])
        assert torch.equal(fused // half + FIRST_CONTENT, x[rows, pos])
    assert data("copy", pair_tokens=1).vocab_size == FIRST_CONTENT + 16  # fused ids only for mqar
