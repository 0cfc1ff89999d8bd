"""gpt2/induction.py: the second copy of a repeated random passage, and nothing else, is scored."""

import pytest
import torch
import torch.nn.functional as F

from gpt2.induction import induction_batches, induction_scores
from gpt2.model import GPT, GPTConfig


def test_the_passage_repeats_and_only_the_second_copy_is_a_target():
    (x, y), = induction_batches(1, 3, 10, 5, 50, seed=0)
    assert x.shape == y.shape == (3, 19)
    seq = torch.cat([x, y[:, -1:]], dim=1)  # the whole 2L sequence back
    assert torch.equal(seq[:, :10], seq[:, 10:]) and ((x >= 5) & (x < 50)).all()
    assert (y[:, :10] == -1).all() and torch.equal(y[:, 10:], seq[:, 11:])
    again = induction_batches(1, 3, 10, 5, 50, seed=0)[0][0]
    assert torch.equal(again, x) and not torch.equal(induction_batches(1, 3, 10, 5, 50, seed=1)[0][0], x)


def test_scores_are_the_loss_and_accuracy_of_the_second_copy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=40)).eval()
    batches = induction_batches(2, 4, 12, 1, 40, seed=3)
    scores = induction_scores(model, batches)
    x, y = batches[1]
    with torch.no_grad():
        logits, _ = model(x)
    counted = y >= 0
    assert scores["loss"][1] == pytest.approx(float(F.cross_entropy(logits[counted], y[counted])), abs=1e-5)
    assert scores["acc"][1] == pytest.approx(float((logits.argmax(-1) == y)[counted].float().mean()))
    assert len(scores["loss"]) == len(scores["acc"]) == 2


@pytest.mark.parametrize("args, message", [((1, 2, 10, 0, 50, 0), "1 <= low < high"),
                                           ((1, 2, 10, 9, 9, 0), "1 <= low < high"),
                                           ((1, 2, 1, 5, 50, 0), "at least 2 tokens")])
def test_bad_settings_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        induction_batches(*args)
