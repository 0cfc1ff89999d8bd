from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2.lm import sample_next
from gpt2.model import GPT, GPTConfig, MLP, ReciprocalMLP


def small_hf():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=101,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and LayerNorms non-trivial, so a mis-mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


def test_hf_weight_parity():
    hf = small_hf()
    model = GPT.from_hf_model(hf).eval()
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_from_pretrained_local_directory(tmp_path):
    hf = small_hf()
    hf.save_pretrained(tmp_path)  # safetensors
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-4)


def test_forward_returns_logits_and_loss():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 50)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    logits, loss = model(idx)
    assert loss is None


def test_too_long_sequence_is_an_error():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=50))
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("prune", [False, True])
def test_generate_runs_past_block_size(prune):
    """At block_size the cache is emptied and refilled from the last half block
    (decode == forward is tests/test_vcache.py's, for every method)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=40,
                    v_cache={"select": {"kind": "prune", "k_min": 8, "recency": 4} if prune else {"kind": "full"},
                             "codec": {"kind": "none"}})
    model = GPT(cfg).eval()
    idx = torch.randint(0, 40, (2, 40))
    out = model.generate(idx[:, :5], 50, temperature=1.0, top_k=5)  # runs past block_size
    assert out.shape == (2, 55)


def test_generate_samples_only_among_the_top_k():
    """top_k=1 is greedy decoding: each new token is the full forward's argmax."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=40)).eval()
    out = model.generate(torch.randint(0, 40, (3, 6)), 12, temperature=2.0, top_k=1)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(out[:, 6:], logits[:, 5:].argmax(-1))


@pytest.mark.parametrize("top_k", [None, 3, 40])
def test_sample_next_draws_from_the_softmax_over_the_top_k(top_k):
    """The draw's frequencies match softmax(logits / T) over the k largest
    logits (all of them without top_k), within 5 standard errors; no other id
    is ever drawn."""
    torch.manual_seed(0)
    logits = torch.randn(8) * 2
    n = 20000
    draws = sample_next(logits.expand(n, 8), temperature=0.7, top_k=top_k)
    assert draws.shape == (n, 1) and draws.dtype == torch.long
    p = F.softmax(logits / 0.7, dim=-1)
    if top_k is not None and top_k < 8:
        p = torch.where(logits >= logits.topk(top_k).values[-1], p, 0.0)
        p = p / p.sum()
    freq = torch.bincount(draws[:, 0], minlength=8).double() / n
    se = (p * (1 - p) / n).sqrt().double()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)
    assert (freq[p == 0] == 0).all()


@pytest.mark.parametrize("top_k", [0, -1, 2.5])
def test_generate_rejects_a_top_k_that_is_not_an_int_of_at_least_one(top_k):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10)).eval()
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=top_k)


def test_rmlp_parameter_count_and_shape():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=10, rmlp=True, rmlp_rff=16)
    std, rec = MLP(cfg), ReciprocalMLP(cfg)
    n_std = sum(p.numel() for p in std.parameters())
    assert sum(p.numel() for p in rec.parameters()) == n_std + 3  # alpha and two gates
    x, a = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    assert rec(x, a).shape == (2, 8, 32)
    assert rec.gate_std.item() == pytest.approx((128 - 16) / 128)
    assert rec.gate_rec.item() == pytest.approx(16 / 128)


def test_rmlp_with_alpha_zero_and_unit_gates_is_a_standard_mlp():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=10, rmlp=True, rmlp_rff=16)
    std, rec = MLP(cfg), ReciprocalMLP(cfg)
    rec.load_state_dict({**std.state_dict(), "alpha": torch.tensor(0.0),
                         "gate_std": torch.tensor(1.0), "gate_rec": torch.tensor(1.0)})
    x, a = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    assert torch.allclose(rec(x, a), std(x), atol=1e-6)
    rec.alpha.data.fill_(1.0)  # and the reciprocal branch really sees the attention output
    assert not torch.allclose(rec(x, a), std(x), atol=1e-4)


def test_mfu_counts_flops_per_token_times_tokens():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    n = model.get_num_params()
    flops_per_token = 6 * n + 12 * 2 * 2 * 16 * 16  # PaLM: 6N + 12 L H Q T
    assert model.estimate_mfu(1000, 2.0, 1e9) == pytest.approx(flops_per_token * 1000 / 2.0 / 1e9)


def test_checkpoint_from_before_the_method_record_loads(tmp_path):
    """model_config with kv_prune* / kvsplice_strategy fields (older checkpoints)
    becomes the equivalent V-cache record; an unknown field is a clear error."""
    torch.manual_seed(0)
    record = {"select": {"kind": "prune", "keep_ratio": 0.25, "k_min": 8, "recency": 4}, "codec": {"kind": "none"}}
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=48, vocab_size=40, v_cache=record))
    old_config = {k: v for k, v in asdict(model.config).items() if k != "v_cache"}
    old_config.update(kv_prune=True, kv_prune_keep_ratio=0.25, kv_prune_k_min=8, kv_prune_recency=4,
                      kvsplice_strategy="B")
    old = {"model": model.state_dict(), "model_config": old_config, "kvsplice": None}
    loaded = GPT.from_checkpoint_state(old).eval()
    assert loaded.config.v_cache == record
    idx = torch.randint(0, 40, (1, 40))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])
    old["model_config"]["kv_mystery"] = 1
    with pytest.raises(ValueError, match=r"fields this version does not know: \['kv_mystery'\]"):
        GPT.from_checkpoint_state(old)


def test_a_checkpoint_of_the_old_format_loads_with_its_geometry():
    """tests/data/old_format_checkpoint.pt was written by the code of commit
    1339e07, when the KVSplice geometry was a side entry ("kvsplice") of the
    checkpoint and not in the model's state_dict: a 2-layer model with
    pruning and splinepca (k 4, knots 3; layer 0's spline is a learned one),
    with the logits it computed. It loads into the codecs, fitted, and
    computes the same logits."""
    path = Path(__file__).parent / "data" / "old_format_checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    assert "kvsplice" in ckpt and not any(".vcache." in n for n in ckpt["model"])
    model = GPT.from_checkpoint(path).eval()
    assert model.config.v_cache == {"select": {"kind": "prune", "keep_ratio": 0.5, "k_min": 8, "recency": 4},
                                    "codec": {"kind": "splinepca", "k": 4, "knots": 3}}
    assert not model.needs_fit() and not model.v_codecs()[0].geometry.spline.is_identity
    with torch.no_grad():
        logits, _ = model(ckpt["test_idx"])
    assert torch.allclose(logits, ckpt["test_logits"], atol=1e-6, rtol=0)
    assert all(".vcache.codec.geometry." in n or ".vcache.codec.fit_done" in n
               for n in set(model.state_dict()) - set(ckpt["model"]))
