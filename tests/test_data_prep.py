import json
import math

import numpy as np
import pytest

from gpt2.prepare_data import decode_tokens, load_meta, main, prepare, unigram_entropy
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


def test_shakespeare(tmp_path):
    out = prepare("shakespeare", data_dir=tmp_path, compact_vocab=True)
    train, val, meta = _read(out)
    total = meta["train_tokens"] + meta["val_tokens"]
    assert 1_200_000 < total < 2_500_000
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["val_tokens"] == int(total * 0.1)
    assert meta["vocab_size"] > 10_000
    eot = meta["id_map"].index(EOT_ID)
    assert int((train == eot).sum() + (val == eot).sum()) == 37  # between 38 plays
    assert "Exeunt" in decode_tokens(val[-100:], meta)
    assert json.loads((out / "meta.json").read_text())["dataset"] == "shakespeare"

    entropy = unigram_entropy(out)
    assert math.isfinite(entropy) and 3.0 < entropy < math.log(meta["vocab_size"])
