"""gpt2/bench/kv_memory.py and `bench_kv.py --memory`: every method's KV bytes, confirmed by a
real generation through its cache, then counted at longer contexts and against a 1 GiB budget;
on a tiny stand-in for SmolLM2 (tests/test_bench_kv.py's)."""

import re

import pytest
import torch

from gpt2.bench import kv_memory
from gpt2.bench.kv_bench import main
from test_bench_kv import tiny_smollm2  # noqa: F401  (a fixture)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(kv_memory, "PROMPT", 90)
    monkeypatch.setattr(kv_memory, "NEW_TOKENS", 6)
    monkeypatch.setattr(kv_memory, "CONTEXTS", (96, 384, 1536))


def test_memory_section_counts_what_each_real_cache_holds(tiny_smollm2, tiny_data_dir, tmp_path, small):  # noqa: F811
    out_md = tmp_path / "benchmarks.md"
    out_md.write_text("# KV-cache benchmark: post-hoc V-cache methods\n\n## Decode speed\n\nits table\n\n"
                      "## Regenerate\n\n    python scripts/bench_kv.py --ckpt runs/a/V0/best.pt\n\nMachine: old.\n")
    main(["--memory", "--data-dir", str(tiny_data_dir), "--out-md", str(out_md), "--threads", "1"])
    text = out_md.read_text()
    assert "## KV memory" in text and "## Decode speed\n\nits table" in text  # the other sections kept
    assert "    python scripts/bench_kv.py --memory" in text and "--ckpt runs/a/V0/best.pt" in text
    for name, _ in kv_memory.METHODS:
        assert f"| {name} |" in text


def test_counts_grow_with_context_and_the_longest_context_is_the_last_that_fits(tiny_smollm2, tiny_data_dir,  # noqa: F811
                                                                                 small):
    from gpt2.bench.kv_bench import ensure_data, _log
    from gpt2.bench.kv_measure import eval_data
    from gpt2.bench.kv_methods import prune_settings
    from gpt2.bench.kv_source import load_pretrained, open_source

    ckpt, pretrained = open_source("smollm2", str(tiny_data_dir))
    ensure_data("smollm2", ckpt, pretrained, _log)
    model = load_pretrained("smollm2", block_size=96).eval()
    data, _ = eval_data("smollm2", ckpt["args"], 90, model.config.vocab_size, str(tiny_data_dir), 1, 1, 1337)
    rows = {r.name: r for r in kv_memory.memory_rows(model, data, prune_settings(ckpt), log=lambda m: None)}
    full, int4 = rows["full (V0)"], rows["int4 g32"]
    cfg = model.config
    kv_heads = cfg.n_layer * cfg.n_kv_head
    for r in rows.values():
        assert r.measured["tokens"] == 96  # the prompt and every drawn token
        totals = [r.per_token[c]["total"] for c in kv_memory.CONTEXTS]
        assert totals == sorted(totals) and len(set(totals)) == len(totals)
        # keys are kept in full by every method: bf16 keys at 1536 tokens
        assert r.per_token[1536]["k"] == kv_heads * cfg.head_dim * 1536 * 2
        assert r.per_token[1536]["v"] < full.per_token[1536]["v"] or r is full
    # the longest context is the last whose count fits the budget
    none = model.v_codecs()[0]  # the full cache's codec, as memory_rows leaves the model
    for budget in (10 ** 6, 2 ** 30):
        T = kv_memory.longest_context(cfg, full.record, none, 0, budget)
        count = lambda t: kv_memory.count(cfg, full.record, none, t, torch.bfloat16, 0)["total"]  # noqa: E731
        assert count(T) <= budget < count(T + 1)
    assert full.per_token[1536]["v"] == full.per_token[1536]["k"] and full.per_token[1536]["index"] == 0
    assert int4.per_token[1536]["v"] == kv_heads * 1536 * (cfg.head_dim // 2 + 4)  # 4-bit codes + fp16 scale, zero
    assert full.longest < int4.longest < rows["V23 int2 g32"].longest
    assert rows["V19 prune"].measured["index"] > 0  # positions and scores of the held tokens
    # 1 GiB: the full cache holds 2 bytes of K and of V per dim: 2 * 2 * dims per token
    assert full.longest == 2 ** 30 // (4 * kv_heads * cfg.head_dim)


def test_a_count_that_disagrees_with_the_real_cache_stops_the_run(tiny_smollm2, tiny_data_dir, small,  # noqa: F811
                                                                   monkeypatch):
    real = kv_memory.count

    def off_by_one_vector(cfg, record, codec, T, dtype, index_per_held, block_size=None):
        out = real(cfg, record, codec, T, dtype, index_per_held, block_size)
        return {**out, "v": out["v"] + cfg.head_dim * dtype.itemsize}

    monkeypatch.setattr(kv_memory, "count", off_by_one_vector)
    with pytest.raises(RuntimeError, match="the real cache holds"):
        main(["--memory", "--data-dir", str(tiny_data_dir), "--out-md", str(tiny_data_dir / "m.md"),
              "--threads", "1"])


def test_memory_takes_no_checkpoint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--memory", "--ckpt", "smollm2"])
    assert e.value.code == 2 and "--memory measures SmolLM2's memory alone" in capsys.readouterr().err


def test_profile_decode_floors_time_each_paths_attention(capsys):
    """scripts/profile_decode.py --floors: per layer, the four prefill attentions (one compiled) and the three step
    reads, each timed (a positive figure), no model built."""
    from gpt2.bench import decode_profile

    decode_profile.main(["--floors", "--batches", "1,2", "--prompt", "48", "--new", "8"])
    out = capsys.readouterr().out
    for batch in (1, 2):
        assert f"batch {batch}:" in out
    rows = re.findall(r"^    (prefill of 48|step read): .*? ([0-9.]+) ms$", out, flags=re.M)
    assert len(rows) == 14 and all(float(ms) > 0 for _, ms in rows)
    assert out.count("step read: SplinePCA k 16, 391 tokens") == 2 and "weights @ V of 52 tokens" in out


def test_profile_decode_on_the_pretrained_source_times_its_methods(tiny_smollm2, tiny_data_dir, capsys):  # noqa: F811
    """scripts/profile_decode.py --model smollm2: the plain cache, int4 and the frontier's best (a fitted
    transform codec behind sinks and a window), eager, each profiled."""
    from gpt2.bench import decode_profile

    decode_profile.main(["--model", "smollm2", "--batches", "1", "--prompt", "80", "--new", "4", "--repeats", "1",
                         "--steps", "2", "--top", "2", "--data-dir", str(tiny_data_dir)])
    out = capsys.readouterr().out
    assert "SmolLM2-135M at block 84; prompt 80 + 4 new, eager" in out
    for name in ("V0", "int4", "kvtc+sinks+window"):
        assert f"    {name} " in out and f"  {name} (batch 1): " in out
