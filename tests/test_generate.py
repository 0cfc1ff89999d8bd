"""gpt2/generate.py, `python -m gpt2.generate`: text through a V-cache method from one
command, on a tiny trained checkpoint. The text streams; the last line reports the
cache's memory, which equals what its tensors hold; a method that needs a fit is
fitted once and its fit reused; every bad input is one line and nothing written."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_args
from gpt2 import generate
from gpt2.train import train

INT4 = {"select": {"kind": "full"}, "codec": {"kind": "int4"}}
PCA = {"select": {"kind": "sinks", "sinks": 2, "window": 4}, "codec": {"kind": "pca", "k": 8}}


@pytest.fixture(scope="module")
def checkpoint(tiny_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    assert train(tiny_args(tiny_data_dir, run, "--max-iters", "4"))["complete"]
    return run / "last.pt"


def gen(checkpoint, tmp_path, *extra):
    return generate.main(["--model", str(checkpoint), "--prompt", "THESEUS:", "--max-new-tokens", "12",
                          "--fit-dir", str(tmp_path / "fits"), *extra])


def test_the_text_streams_and_the_last_line_reports_the_caches_measured_memory(checkpoint, tmp_path, capsys):
    out = gen(checkpoint, tmp_path, "--v-cache", json.dumps(INT4), "--temperature", "0")
    captured = capsys.readouterr()
    assert captured.out == "THESEUS:" + out["text"] + "\n"  # the prompt, then the drawn text as it streamed
    cache, stats = out["cache"], out["stats"]
    held = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.k, layer.v))
    assert stats["cache_at_end"]["total"] == held == cache.nbytes()["total"]
    assert stats["cache_after_prompt"]["total"] < stats["cache_at_end"]["total"]
    model = generate.Source(generate.parse_args(["--model", str(checkpoint), "--prompt", "x"])).model
    plain = generate.plain_cache_bytes(model, cache.length)
    assert cache.nbytes()["k"] == plain // 2 and cache.nbytes()["v"] < plain // 2  # int4 V: fewer bytes
    line = captured.err.strip().splitlines()[-1]
    assert line == out["line"] and "tok/s" in line and f"for {cache.length:,} tokens; the plain cache" in line
    # greedy: the same tokens again, and those of the full forward's argmax
    again = gen(checkpoint, tmp_path, "--v-cache", json.dumps(INT4), "--temperature", "0")
    assert again["ids"] == out["ids"]


def test_a_method_that_needs_a_fit_is_fitted_once_and_the_fit_reused(checkpoint, tmp_path, capsys):
    first = gen(checkpoint, tmp_path, "--v-cache", json.dumps(PCA))
    err = capsys.readouterr().err
    assert "[generate] fitting sinks(sinks=2, window=4) + pca(k=8" in err and "its training data" in err
    assert len(list((tmp_path / "fits").glob("*.pt"))) == 1
    second = gen(checkpoint, tmp_path, "--v-cache", json.dumps(PCA))
    err = capsys.readouterr().err
    assert "fitting" not in err and "[generate] the fit of" in err
    for a, b in zip(first["cache"].layers, second["cache"].layers):
        assert a.length == b.length
    text = tmp_path / "fit.txt"
    text.write_text("THESEUS:\nNow, fair Hippolyta,\n" * 40)
    gen(checkpoint, tmp_path, "--v-cache", json.dumps(PCA), "--fit-file", str(text))
    assert "fit.txt" in capsys.readouterr().err and len(list((tmp_path / "fits").glob("*.pt"))) == 2


def test_an_ablation_steps_method_is_used(checkpoint, tmp_path, capsys):
    out = gen(checkpoint, tmp_path, "--ablation-step", "V23")
    assert out["cache"].layers[0].codec.kind == "int"


@pytest.mark.parametrize("extra, message", [
    (["--model", "{d}/no/such/dir"], "--model {d}/no/such/dir: no such file or directory"),
    (["--prompt", "  "], "the prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", None, "--prompt-file", "{d}/missing.txt"], "--prompt-file {d}/missing.txt: cannot read it"),
    (["--prompt", "THESEUS:\n" * 200], "longer than"),
    (["--v-cache", '{"select": {"kind": "full"}, "codec": {"kind": "int", "bits": 2, "group_size": 24}}'],
     "the method does not fit"),
    (["--ablation-step", "V99"], "--ablation-step 'V99': known steps: V0, V19"),
    (["--chat", ""], "--chat: {ckpt} has no chat template"),
])
def test_bad_input_is_one_line_and_nothing_is_written(checkpoint, tmp_path, extra, message):
    argv = ["--model", str(checkpoint), "--prompt", "THESEUS:", "--fit-dir", str(tmp_path / "fits")]
    for name, value in zip(extra[::2], extra[1::2]):
        if name in argv:
            i = argv.index(name)
            del argv[i:i + 2]
        if value is not None:  # "" for a flag that takes no value
            argv += [name, value.replace("{d}", str(tmp_path))] if value else [name]
    env = {n: v for n, v in os.environ.items() if n != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gpt2.generate", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message.format(d=tmp_path, ckpt=checkpoint) in lines[0]
    assert r.stdout == "" and not (tmp_path / "fits").exists()


def test_greedy_tokens_through_the_cache_are_the_full_forwards_argmax(checkpoint, tmp_path, capsys):
    out = gen(checkpoint, tmp_path, "--v-cache", json.dumps(INT4), "--temperature", "0")
    model = generate.Source(generate.parse_args(["--model", str(checkpoint), "--prompt", "x"])).model
    model.set_v_cache(INT4)
    ids = torch.tensor([out["ids"]])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    n = len(out["ids"]) - 12
    assert torch.equal(logits[0, n - 1:].argmax(-1), ids[0, n:])
