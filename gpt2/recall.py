"""Synthetic recall tasks whose answers sit in specific earlier tokens' V.

Generated on the fly: every batch is a pure function of (seed, split,
iteration, micro-batch), like gpt2.data.TokenData's, so resume and DDP stay
exact, and nothing is written to disk. The loss is taken only at answer
positions (targets are -1, the model's ignore_index, elsewhere).

Token ids: 0 is filler, 1 the separator, then `n_content` content ids (for
associative recall, keys are the first half and values the second half),
then, for fused mqar pairs, one id per (key, value).

copy      [s_0 .. s_{L-1}, filler x gap, SEP, s_0 .. s_{L-2}]: after SEP the
          model repeats the segment; the answer s_i is predicted at position
          L+gap+i and lies at position i, L+gap tokens back. Every earlier
          token is needed once.
mqar      multi-query associative recall (Zoology, Arora et al. 2023):
          pairs k_1 v_1 .. k_N v_N, filler x gap, then a region in which
          `queries` of the keys (distinct while queries <= pairs, with
          repeats beyond) appear at random positions among filler; the
          target at a query is its value, whose token lies query_pos -
          value_pos back. Only queried pairs matter: a test of selective
          retention. With pair_tokens=1 each pair is ONE token (an id per
          (key, value)), so a query must find that token and read the value
          from its V: one attention hop instead of Zoology's induction
          circuit, which small models form only after many thousand steps.
recall    both in one model: rows alternate between copy and mqar. It learns
          far slower than either alone; `make train` runs one matrix per
          task instead (CONFIG_ABLATION_DATASETS).

Train and val never share a sequence: a sequence belongs to the split given
by the parity of the sum of its first content run (the segment; the pairs'
values), and the generator sets the parity by moving the first such token by one.
"""

import math

import torch

FILLER, SEP, FIRST_CONTENT = 0, 1, 2
TASKS = ("copy", "mqar")
DATASETS = {"copy": ("copy",), "mqar": ("mqar",), "recall": TASKS}
_SPLIT_PARITY = {"train": 0, "val": 1}


def is_recall(dataset):
    return dataset in DATASETS


class RecallData:
    """The TokenData interface (get_batch, vocab_size, check_block_size) for recall tasks."""

    def __init__(self, dataset, n_content=64, segment=32, gap=0, pairs=8, queries=8, pair_tokens=2):
        if dataset not in DATASETS:
            raise ValueError(f"unknown recall dataset {dataset!r}; known: {', '.join(DATASETS)}")
        self.dataset, self.tasks = dataset, DATASETS[dataset]
        self.n_content, self.segment, self.gap = n_content, segment, gap
        self.pairs, self.queries, self.pair_tokens = pairs, queries, pair_tokens
        half = n_content // 2
        # a fused pair (pair_tokens 1) is one token per (key, value): ids after the content ids
        fused = pair_tokens == 1 and "mqar" in self.tasks
        self.vocab_size = FIRST_CONTENT + n_content + (half * half if fused else 0)
        self.dir = f"(generated: {self.describe()})"

    def describe(self):
        parts = []
        if "copy" in self.tasks:
            parts.append(f"copy of {self.segment} tokens")
        if "mqar" in self.tasks:
            parts.append(f"mqar {self.queries} of {self.pairs} pairs")
        return f"{' + '.join(parts)}, {self.n_content} content ids, gap {self.gap}"

    def problems(self, block_size):
        """Every setting that cannot work at this block_size, as messages."""
        out = []
        if self.n_content < 4:
            out.append(f"--recall-vocab must be >= 4, got {self.n_content}")
        if self.gap < 0:
            out.append(f"--recall-gap must be >= 0, got {self.gap}")
        if "copy" in self.tasks:
            if self.segment < 1:
                out.append(f"--recall-segment must be >= 1, got {self.segment}")
            elif 2 * self.segment + self.gap > block_size:
                out.append(f"copy needs 2 x --recall-segment + --recall-gap = {2 * self.segment + self.gap} "
                           f"<= block_size {block_size}")
        if "mqar" in self.tasks:
            if self.queries < 1:
                out.append(f"--recall-queries must be >= 1, got {self.queries}")
            if self.pairs > self.n_content // 2:
                out.append(f"--recall-pairs {self.pairs} exceeds the {self.n_content // 2} keys of --recall-vocab")
            elif self.pair_tokens * self.pairs + self.gap + self.queries > block_size:
                out.append(f"mqar needs {self.pair_tokens} x --recall-pairs + --recall-gap + --recall-queries = "
                           f"{self.pair_tokens * self.pairs + self.gap + self.queries} <= block_size {block_size}")
            if self.pair_tokens not in (1, 2):
                out.append(f"--recall-pair-tokens must be 1 or 2, got {self.pair_tokens}")
        return out

    def check_block_size(self, block_size):
        problems = self.problems(block_size)
        if problems:
            raise ValueError("; ".join(problems))

    def chance_loss(self):
        """Cross entropy of a model that knows the answer's range but not the answer."""
        sizes = {"copy": self.n_content, "mqar": self.n_content // 2}
        return sum(math.log(sizes[t]) for t in self.tasks) / len(self.tasks)

    def get_batch(self, split, batch_size, block_size, seed, step, micro, device="cpu"):
        """(x, y) int64 (batch_size, block_size); y is -1 except at answers."""
        x, y, _, _ = self.get_batch_with_distance(split, batch_size, block_size, seed, step, micro)
        return x.to(device), y.to(device)

    def get_batch_with_distance(self, split, batch_size, block_size, seed, step, micro):
        """(x, y, distance, task): distance (batch_size, block_size) is how far back
        the token holding each answer lies (0 where y is -1); task (batch_size,)
        indexes TASKS."""
        g = torch.Generator().manual_seed(
            (seed * 1_000_003 + 7 + _SPLIT_PARITY[split]) * 1_000_003 + step * 10_007 + micro)
        x = torch.full((batch_size, block_size), FILLER, dtype=torch.long)
        y = torch.full((batch_size, block_size), -1, dtype=torch.long)
        dist = torch.zeros(batch_size, block_size, dtype=torch.long)
        task = torch.tensor([TASKS.index(self.tasks[(r + micro) % len(self.tasks)]) for r in range(batch_size)])
        for r in range(batch_size):
            make = self._copy if TASKS[task[r]] == "copy" else self._mqar
            make(x[r], y[r], dist[r], g, _SPLIT_PARITY[split])
        return x, y, dist, task

    def _copy(self, x, y, dist, g, parity):
        L, gap = self.segment, self.gap
        s = _with_parity(torch.randint(self.n_content, (L,), generator=g), parity, self.n_content)
        s += FIRST_CONTENT
        x[:L] = s
        x[L + gap] = SEP
        x[L + gap + 1:2 * L + gap] = s[:-1]
        y[L + gap:2 * L + gap] = s
        dist[L + gap:2 * L + gap] = L + gap

    def _mqar(self, x, y, dist, g, parity):
        N, Q, half, P = self.pairs, self.queries, self.n_content // 2, self.pair_tokens
        T = x.numel()
        key_ids = torch.randperm(half, generator=g)[:N]
        value_ids = _with_parity(torch.randint(half, (N,), generator=g), parity, half)
        keys, values = key_ids + FIRST_CONTENT, value_ids + FIRST_CONTENT + half
        if P == 2:
            x[0:2 * N:2], x[1:2 * N:2] = keys, values
        else:
            x[:N] = FIRST_CONTENT + self.n_content + key_ids * half + value_ids
        start = P * N + self.gap
        # which pairs, in query order: distinct while there are enough, then with repeats
        asked = torch.randperm(N, generator=g)[:Q] if Q <= N else torch.randint(N, (Q,), generator=g)
        where = torch.randperm(T - start, generator=g)[:Q].sort().values + start
        x[where] = keys[asked]
        y[where] = values[asked]
        dist[where] = where - (P * asked + P - 1)  # the value's token (the fused pair's)


def _with_parity(ids, parity, size):
    """ids (in [0, size)) with the parity of their sum set by moving ids[0] by one."""
    if int(ids.sum()) % 2 != parity:
        ids[0] += 1 if ids[0] + 1 < size else -1
    return ids


@torch.no_grad()
def answer_accuracy(logits, y, dist, task, window):
    """Correct / total answers, overall, near (distance < window) and far, per task.

    Returns {name: (correct, total)} with names "acc", "acc_near", "acc_far",
    "acc_<task>", "acc_<task>_far" for the tasks present.
    """
    answer = y >= 0
    correct = (logits.argmax(-1) == y) & answer
    near = answer & (dist < window)
    far = answer & (dist >= window)
    rows = {t: (task == i)[:, None] for i, t in enumerate(TASKS) if (task == i).any()}
    out = {"acc": correct.sum(), "acc_near": (correct & near).sum(), "acc_far": (correct & far).sum()}
    totals = {"acc": answer.sum(), "acc_near": near.sum(), "acc_far": far.sum()}
    for t, in_task in rows.items():
        out[f"acc_{t}"], totals[f"acc_{t}"] = (correct & in_task).sum(), (answer & in_task).sum()
        out[f"acc_{t}_far"], totals[f"acc_{t}_far"] = (correct & far & in_task).sum(), (far & in_task).sum()
    return {name: (int(out[name]), int(totals[name])) for name in out}


def accuracy_names(tasks):
    """The accuracy entries an evaluation reports, in a fixed order (DDP sums them as one tensor)."""
    return ["acc", "acc_near", "acc_far"] + [f"acc_{t}{part}" for t in tasks for part in ("", "_far")]


def format_accuracy(record, tasks):
    """'acc 0.953 (near n/a, far 0.950; copy 1.000 far 1.000)' from a record's val_acc* entries."""
    def f(name):
        v = record.get(f"val_{name}")
        return "n/a" if v is None else f"{v:.3f}"
    per_task = "; ".join(f"{t} {f('acc_' + t)} far {f('acc_' + t + '_far')}" for t in tasks)
    return f"acc {f('acc')} (near {f('acc_near')}, far {f('acc_far')}" + (f"; {per_task})" if per_task else ")")
