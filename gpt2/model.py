"""GPT-2 in plain PyTorch, after nanoGPT's model.py.

Attention keeps GPT-2's ONE combined `c_attn` projection (Q, K, V in one GEMM)
so Hugging Face GPT-2 weights load as they are. The research hook is one
V-cache method per attention, `attn.vcache` (lib/vcache.py), built from the
record GPTConfig.v_cache: full attention by default; V-only pruning, a
KVSplice geometry, int8/int4 V, H2O or a composition otherwise. A fitted
codec's state is part of the model's state_dict.

The same method serves training (attend, full sequence) and decoding (its
cache, one per layer), so the two cannot drift apart.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.lm import CausalLM, attend
from lib.vcache import build_method, full_record

# GPTConfig fields of checkpoints written before GPTConfig.v_cache held the method
_LEGACY_FIELDS = ("kv_prune", "kv_prune_keep_ratio", "kv_prune_k_min", "kv_prune_recency", "kvsplice_strategy")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 uses biases in Linear and LayerNorm
    # the V-cache method of every attention layer: a lib.vcache record
    v_cache: dict = field(default_factory=full_record)
    # Reciprocal MLP (V21)
    rmlp: bool = False
    rmlp_rff: int = 64

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.vcache = build_method(config.v_cache, config.block_size, config.head_dim)

    def forward(self, x, cache=None, pos=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = attend(self, q, k, v, cache, pos)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_out=None):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class ReciprocalMLP(nn.Module):
    """MLP whose up-projection is split in two branches.

    The standard branch (width D_ff - R_ff) sees x; the reciprocal branch
    (width R_ff) sees x + alpha * attn_out, the same block's attention output.
    Both are GELU'd, scaled by learned gates initialised to their width
    fractions, concatenated and projected down. The weights are those of a
    standard MLP (`c_fc` rows split, same names), so the parameter count and
    the checkpoint layout are a standard MLP's plus three scalars.
    """

    def __init__(self, config):
        super().__init__()
        d_ff = 4 * config.n_embd
        if not 0 < config.rmlp_rff < d_ff:
            raise ValueError(f"rmlp_rff must be in (0, {d_ff}), got {config.rmlp_rff}")
        self.c_fc = nn.Linear(config.n_embd, d_ff, bias=config.bias)
        self.c_proj = nn.Linear(d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.n_std = d_ff - config.rmlp_rff
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.gate_std = nn.Parameter(torch.tensor(self.n_std / d_ff))
        self.gate_rec = nn.Parameter(torch.tensor(config.rmlp_rff / d_ff))

    def forward(self, x, attn_out):
        w, b = self.c_fc.weight, self.c_fc.bias
        n = self.n_std
        h_std = F.linear(x, w[:n], None if b is None else b[:n])
        h_rec = F.linear(x + self.alpha * attn_out, w[n:], None if b is None else b[n:])
        h = torch.cat([self.gate_std * F.gelu(h_std, approximate="tanh"),
                       self.gate_rec * F.gelu(h_rec, approximate="tanh")], dim=-1)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = ReciprocalMLP(config) if config.rmlp else MLP(config)

    def forward(self, x, cache=None, pos=None):
        a = self.attn(self.ln_1(x), cache, pos)
        x = x + a
        return x + self.mlp(self.ln_2(x), a)


class GPT(CausalLM):
    family, config_class = "gpt2", GPTConfig

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        config.v_cache = self.transformer.h[0].attn.vcache.record()  # every setting, defaults filled in
        self.apply(self._init_weights)
        # GPT-2 paper: scaled init of the residual projections
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def attentions(self):
        return [block.attn for block in self.transformer.h]

    def get_num_params(self, non_embedding=True):
        n = super().get_num_params()
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, caches=None, last_only=False, pos=None):
        """Returns (logits, loss) as nanoGPT; logits for every position, or
        with last_only (sampling) for the last one alone.

        With `caches` (a lib.kv_cache.KVCache), idx holds only the new tokens
        and positions continue from what the cache already holds. With `pos`
        as well (a (1,) long tensor equal to caches.length, idx (B, 1)), the
        token goes through each layer's fixed-shape `step`, which reads no
        Python int that changes from step to step; the caller checks the
        length and calls caches.advance() (see decode_step).
        """
        positions = self.positions(idx, caches, pos)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches.layers[i], pos)
        return self.head(x, self.transformer.ln_f, targets, last_only)

    # ---- the V-cache method --------------------------------------------------

    def v_projections(self):
        """Per layer, (module, fn): the module whose output carries V, and fn(output)
        -> that layer's V as rows (n, head_dim). What the calibrator hooks."""
        def v_rows(output):
            return output[..., 2 * self.config.n_embd:].reshape(-1, self.config.head_dim)  # V of [Q | K | V]
        return [(block.attn.c_attn, v_rows) for block in self.transformer.h]

    # ---- weights -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0, **overrides):
        """Load Hugging Face GPT-2 weights (a local transformers directory with
        safetensors or pytorch_model.bin, or a hub name when online)."""
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        return cls.from_hf_model(hf, dropout=dropout, **overrides)

    @classmethod
    def from_hf_model(cls, hf, dropout=0.0, **overrides):
        c = hf.config
        config = GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                           block_size=c.n_positions, vocab_size=c.vocab_size,
                           bias=True, dropout=dropout, **overrides)
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict())
        return model

    def hf_weight(self, name, tensor):
        # HF uses Conv1D modules: their weights are the transpose of nn.Linear's
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        return tensor.t() if name.endswith(transposed) else tensor

    @classmethod
    def config_from_checkpoint(cls, ckpt):
        """Checkpoints written before the V-cache method was one record (kv_prune,
        kv_prune_* and kvsplice_strategy fields) are translated; strategies A and B were equal."""
        saved = dict(ckpt["model_config"])
        if any(name in saved for name in _LEGACY_FIELDS):
            legacy = {name: saved.pop(name) for name in _LEGACY_FIELDS if name in saved}
            select = ({"kind": "prune", "keep_ratio": legacy.get("kv_prune_keep_ratio"),
                       "k_min": legacy.get("kv_prune_k_min"), "recency": legacy.get("kv_prune_recency")}
                      if legacy.get("kv_prune") else {"kind": "full"})
            geometry = ckpt.get("kvsplice")
            codec = ({"kind": "splinepca", "k": geometry["k"], "knots": geometry["knots"]}
                     if geometry is not None else {"kind": "none"})
            saved["v_cache"] = {"select": select, "codec": codec}
        return super().config_from_checkpoint({**ckpt, "model_config": saved})

    @classmethod
    def state_from_checkpoint(cls, ckpt, model):
        if "kvsplice" not in ckpt:
            return ckpt["model"]
        # written before the codec owned its state: the geometry was a side entry
        return {**{n: t for n, t in model.state_dict().items() if ".attn.vcache." in n}, **ckpt["model"],
                **legacy_geometry_state(ckpt["kvsplice"], model.config)}

    def crop_block_size(self, block_size):
        """Use a shorter context than the loaded weights were trained with (nanoGPT)."""
        super().crop_block_size(block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

def legacy_geometry_state(geometry, config):
    """The codec state_dict entries of a checkpoint's old "kvsplice" entry (one
    SplinePCA state per layer, or one shared), or {} when it held none."""
    if geometry is None:
        return {}
    layers = geometry["state_dict"] * (config.n_layer if geometry["shared"] else 1)
    state = {}
    for i, layer in enumerate(layers):
        prefix = f"transformer.h.{i}.attn.vcache.codec."
        state.update({prefix + "geometry." + n: t for n, t in layer.items()})
        state[prefix + "fit_done"] = torch.tensor(True)
    return state
