"""The induction test: a context measure that pretrained LMs pass.

A passage of `length` random token ids, then the same passage again (as
TransformerLens's induction_loss builds it). No n-gram statistic predicts a
random id, so a model can predict the second copy only by finding the
earlier occurrence of the current token and copying what followed it: the
loss and accuracy on the second copy measure that use of context. The
answer to every position lies `length` tokens back, so with `length`
beyond a V-cache method's recency window a pruned cache must have kept the
right tokens' V.

Targets are -1 (ignored by the models' cross entropy) everywhere but the
second copy's positions 1 .. length-1; its first token follows the first
copy's last one, which nothing predicts.
"""

import torch


def induction_batches(n_batches, batch_size, length, low, high, seed):
    """[(x, y)], x and y (batch_size, 2 * length - 1) long: the passages and their
    targets, ids drawn uniformly from [low, high) by a generator seeded with seed."""
    if not 1 <= low < high:
        raise ValueError(f"token ids must come from [low, high) with 1 <= low < high, got [{low}, {high})")
    if length < 2:
        raise ValueError(f"the passage needs at least 2 tokens, got {length}")
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        passage = torch.randint(low, high, (batch_size, length), generator=g)
        seq = torch.cat([passage, passage], dim=1)  # (B, 2L)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :length] = -1  # the first copy and the second copy's first token: nothing to recall
        batches.append((x, y))
    return batches


@torch.no_grad()
def induction_scores(model, batches):
    """Per batch, the mean loss and the accuracy (argmax) on the second copy: {"loss": [...], "acc": [...]}."""
    out, device = {"loss": [], "acc": []}, model.lm_head.weight.device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, loss = model(x, y)
        counted = y >= 0
        out["loss"].append(float(loss))
        out["acc"].append(float((logits.argmax(-1) == y)[counted].float().mean()))
    return out
