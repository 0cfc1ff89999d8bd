"""Token memmaps written by gpt2/prepare_data.py, and batches drawn from them.

Every batch is a pure function of (seed, split, iteration, micro-batch index):
a resumed run sees the same data as an uninterrupted one, and DDP ranks split
one global batch between them (rank r takes its own micro-batches) instead of
sampling independently, so N ranks reproduce one process with the same
global batch.
"""

import json
from pathlib import Path

import numpy as np
import torch

from gpt2.recall import RecallData, is_recall
from gpt2.tokenizer import GPT2, tokenizer_suffix

PREPARE_HINT = "run `make data` or `python -m gpt2.prepare_data --dataset {dataset}{flag}`"

_SPLIT_SALT = {"train": 0, "val": 1}


def dataset_dir_name(dataset, tokenizer=GPT2):
    """Directory name under data/ for a --dataset value (file:PATH -> file-<stem>),
    and the tokenizer's suffix for any but GPT-2's (shakespeare-raw-smollm2)."""
    name = "file-" + Path(dataset[5:]).stem if dataset.startswith("file:") else dataset
    return name + tokenizer_suffix(tokenizer)


# The form of the text prepare_data writes (meta.json "text"): the plays as
# plain text, or their Markdown as shipped; other corpora as they are read.
_TEXT_FORMS = {"shakespeare": "plain", "shakespeare-raw": "markdown"}


def text_form(dataset):
    return _TEXT_FORMS.get(dataset, "as read")


def stale_reason(meta, dataset):
    """Why a prepared dataset is not what `dataset` names now, or None: data/shakespeare
    prepared before the plays were made plain text holds their Markdown."""
    if dataset in _TEXT_FORMS and meta.get("text") != text_form(dataset):
        return f"it holds {meta.get('text', 'markdown')} text, but --dataset {dataset} is {text_form(dataset)} text"
    return None


class TokenData:
    def __init__(self, data_dir, dataset, tokenizer=GPT2):
        self.dir = Path(data_dir) / dataset_dir_name(dataset, tokenizer)
        hint = PREPARE_HINT.format(dataset=dataset, flag="" if tokenizer == GPT2 else f" --tokenizer {tokenizer}")
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no prepared data for dataset '{dataset}' at {self.dir}: {hint}")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("tokenizer", GPT2) != tokenizer:
            raise FileNotFoundError(f"{self.dir} was tokenized with {self.meta.get('tokenizer')}, not {tokenizer}: "
                                    f"{hint}")
        stale = stale_reason(self.meta, dataset)
        if stale:
            raise FileNotFoundError(f"{self.dir} was prepared by an older version ({stale}): {hint}")
        self.splits = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            if not path.exists() or path.stat().st_size == 0:
                raise FileNotFoundError(f"{path} is missing or empty: {hint}")
            self.splits[split] = np.memmap(path, dtype=np.uint16, mode="r")
        self.vocab_size = int(self.meta["vocab_size"])

    def check_block_size(self, block_size):
        for split, data in self.splits.items():
            if len(data) <= block_size + 1:
                raise ValueError(f"{split} split of {self.dir} has {len(data)} tokens, "
                                 f"fewer than block_size + 2 = {block_size + 2}")

    def get_batch(self, split, batch_size, block_size, seed, step, micro, device="cpu"):
        """(x, y) int64 tensors of shape (batch_size, block_size)."""
        data = self.splits[split]
        # modulo 2**64, the range torch seeds take; a no-op for the seeds below 2**24
        g = torch.Generator().manual_seed(
            ((seed * 1_000_003 + _SPLIT_SALT[split]) * 1_000_003 + step * 10_007 + micro) % 2 ** 64)
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
        rows = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if device.startswith("cuda"):
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.contiguous().to(device), y.contiguous().to(device)


def recall_data(args):
    return RecallData(args.dataset, args.recall_vocab, args.recall_segment, args.recall_gap,
                      args.recall_pairs, args.recall_queries, args.recall_pair_tokens)


def open_data(args):
    """The dataset the flags name: prepared token memmaps, or a recall task generated on the fly."""
    data = recall_data(args) if is_recall(args.dataset) else TokenData(args.data_dir, args.dataset, args.tokenizer)
    data.check_block_size(args.block_size)
    return data
