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
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.kv_cache import KVCache, static_address
from lib.vcache import FULL, build_method, describe

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
    v_cache: dict = field(default_factory=lambda: {"select": dict(FULL["select"]), "codec": dict(FULL["codec"])})
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
        if pos is not None:  # one token at position pos (a tensor), fixed shapes: GPT.decode_step
            y = cache.step(q, k, v, pos)
        elif cache is not None:  # made by self.vcache.make_cache(): the same method, incrementally
            y = cache(q, k, v)
        else:
            y = self.vcache.attend(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
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


def sample_next(logits, temperature=1.0, top_k=None):
    """One token id per row of logits (B, vocab) -> (B, 1): drawn from
    softmax(logits / temperature), or with top_k from the softmax over the
    k largest logits alone (ties at the k-th are cut where torch.topk cuts).
    The draw runs over those k values and maps back to their ids, so its
    cost does not grow with the vocabulary."""
    logits = logits / max(temperature, 1e-8)
    if top_k is not None and top_k < logits.size(-1):
        top, ids = torch.topk(logits, top_k)
        return ids.gather(-1, torch.multinomial(F.softmax(top, dim=-1), num_samples=1))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


class GPT(nn.Module):
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

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

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
        B, T = idx.size()
        if pos is None:
            start = caches.length if caches is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        else:
            positions = pos
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches.layers[i], pos)
        x = self.transformer.ln_f(x[:, -1:] if last_only else x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # ---- the V-cache method --------------------------------------------------

    def set_v_cache(self, record):
        """Put the method of `record` (a lib.vcache record) into every attention
        layer, unfitted (the calibrator fits a codec that needs it)."""
        device = self.lm_head.weight.device
        for block in self.transformer.h:
            block.attn.vcache = build_method(record, self.config.block_size, self.config.head_dim).to(device)
        self.config.v_cache = self.transformer.h[0].attn.vcache.record()

    def v_codecs(self):
        """Every layer's V codec, in layer order."""
        return [block.attn.vcache.codec for block in self.transformer.h]

    def v_projections(self):
        """Per layer, (module, fn): the module whose output carries V, and fn(output)
        -> that layer's V as rows (n, head_dim). What the calibrator hooks."""
        def v_rows(output):
            return output[..., 2 * self.config.n_embd:].reshape(-1, self.config.head_dim)  # V of [Q | K | V]
        return [(block.attn.c_attn, v_rows) for block in self.transformer.h]

    def needs_fit(self):
        """True while some layer's method waits for the fit its codec needs."""
        return any(block.attn.vcache.needs_fit for block in self.transformer.h)

    # ---- generation with a KV cache ----------------------------------------

    def make_cache(self):
        """One decode cache per layer, each made by that layer's method."""
        return KVCache(self.config.n_layer, lambda i: self.transformer.h[i].attn.vcache.make_cache())

    def _decode_step(self, idx, cache, pos):
        """Logits (B, 1, vocab) of one new token per sequence at position pos, through the cache."""
        return self(idx, caches=cache, last_only=True, pos=pos)[0]

    def decode_step(self, compile=False):
        """A function (idx (B, 1), cache) -> logits (B, 1, vocab) that feeds one
        new token per sequence through a prefilled cache and advances it.

        Eager, it runs the model's forward over the rows the cache holds.
        compile=True compiles the whole step (every layer's cache update and
        attention, the head) as one torch.compile graph of fixed shapes: the
        position is a tensor and attention runs over the cache's whole
        capacity with a mask, so every step of a generation, at any length,
        reuses the first step's graph. On CUDA the graph is captured as a
        CUDA graph (mode="reduce-overhead") and replayed each step: one
        launch instead of one per kernel. The cache's buffers are static
        addresses (lib/kv_cache.py), so the graph writes them in place. The first call
        compiles (tens of seconds; cached for later calls with the same shapes).
        """
        if not compile:
            return lambda idx, cache: self(idx, caches=cache, last_only=True)[0]
        cuda = self.lm_head.weight.is_cuda
        graph = torch.compile(self._decode_step, dynamic=False, fullgraph=True,
                              mode="reduce-overhead" if cuda else None)
        pos = None

        def step(idx, cache):
            nonlocal pos
            if not all(layer.fixed_shape_step for layer in cache.layers):
                raise ValueError(f"compile=True needs a cache with a fixed-shape step; "
                                 f"{type(cache.layers[0]).__name__} (from {describe(self.config.v_cache)}) has none: "
                                 f"decode it with compile=False")
            if cache.length == 0 or cache.length >= self.config.block_size:
                raise ValueError(f"a compiled step needs a prefilled cache with room for one more token: "
                                 f"it holds {cache.length} of {self.config.block_size}")
            if pos is None:
                pos = static_address(torch.zeros(1, dtype=torch.long, device=idx.device))
            pos.fill_(cache.length)  # a kernel, not a copy from the host that would wait for the device
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            logits = graph(idx, cache, pos)
            cache.advance()
            return logits.clone() if cuda else logits  # the next replay overwrites a CUDA graph's output

        return step

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, compile=False, timings=None, cache=None):
        """Sample max_new_tokens after idx (B, T), decoding through a KV cache.

        The cache holds what the model's V-cache method stores: only kept
        tokens (with pruning) and as the k-dim latent (with KVSplice), for
        example. When the context reaches block_size, the cache is emptied
        and refilled from the last block_size // 2 tokens (its buffers are
        reused). compile=True runs each one-token step as one compiled graph
        (decode_step; on CUDA, a CUDA graph); the prompt's prefill runs
        eager. A `timings` dict receives prefill_s (the prompt) and decode_s
        (the new tokens). Each token is drawn by sample_next. `cache`, an
        empty KVCache from make_cache(), is decoded through instead of a new
        one, so the caller can read what it holds afterwards.
        """
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        step = self.decode_step(compile)
        bs = self.config.block_size
        # timings on CUDA wait for the kernels each phase launched
        wait = (lambda: torch.cuda.synchronize(idx.device)) if timings is not None and idx.is_cuda else (lambda: None)
        wait()
        t0 = time.perf_counter()
        cache = self.make_cache() if cache is None else cache
        logits, _ = self(idx[:, -bs:], caches=cache, last_only=True)
        wait()
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            idx_next = sample_next(logits[:, -1, :], temperature, top_k)
            idx = torch.cat((idx, idx_next), dim=1)
            if cache.length >= bs:
                cache.reset()
                logits, _ = self(idx[:, -(bs // 2):], caches=cache, last_only=True)
            else:
                logits = step(idx_next, cache)
        if timings is not None:
            wait()
            timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)
        return idx

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

    def load_hf_state_dict(self, sd_hf):
        # HF uses Conv1D modules: their weights are the transpose of nn.Linear's
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = self.state_dict()
        keys = [k for k in sd if not k.endswith(".attn.bias") and ".attn.vcache." not in k]
        sd_hf = {k: v for k, v in sd_hf.items()
                 if not k.endswith(".attn.masked_bias") and not k.endswith(".attn.bias")}
        missing = [k for k in keys if k not in sd_hf]
        if missing:
            raise ValueError(f"Hugging Face state dict lacks {len(missing)} keys, e.g. {missing[:3]}")
        with torch.no_grad():
            for k in keys:
                src = sd_hf[k]
                if k.endswith(transposed):
                    src = src.t()
                if src.shape != sd[k].shape:
                    raise ValueError(f"shape mismatch for {k}: ours {tuple(sd[k].shape)}, HF {tuple(src.shape)}")
                sd[k].copy_(src)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """Rebuild a model with everything its run used (config, geometry)."""
        return cls.from_checkpoint_state(load_checkpoint(path, map_location))

    @classmethod
    def from_checkpoint_state(cls, ckpt):
        """The same, from a checkpoint dict already loaded (see load_checkpoint)."""
        model = cls(config_from_checkpoint(ckpt))
        state = ckpt["model"]
        if "kvsplice" in ckpt:  # written before the codec owned its state: the geometry was a side entry
            state = {**{n: t for n, t in model.state_dict().items() if ".attn.vcache." in n}, **state,
                     **legacy_geometry_state(ckpt["kvsplice"], config_from_checkpoint(ckpt))}
        model.load_state_dict(state)
        return model

    def crop_block_size(self, block_size):
        """Use a shorter context than the loaded weights were trained with (nanoGPT)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        fitted = [codec.state_dict() for codec in self.v_codecs()]
        self.set_v_cache(self.config.v_cache)  # budgets follow block_size; fitted codecs stay fitted
        for codec, state in zip(self.v_codecs(), fitted):
            codec.load_state_dict(state)

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation (PaLM appendix B), as in nanoGPT."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak_flops


def config_from_checkpoint(ckpt):
    """The GPTConfig a checkpoint was trained with. Checkpoints written before
    the V-cache method was one record (kv_prune, kv_prune_* and
    kvsplice_strategy fields) are translated; strategies A and B were equal."""
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
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"checkpoint's model_config has fields this version does not know: {unknown} "
                         f"(expected {sorted(known)})")
    return GPTConfig(**saved)


def load_checkpoint(path, map_location="cpu"):
    """torch.load with a clear error for a missing or unreadable checkpoint."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found") from None
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"checkpoint {path} cannot be read: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint (expected keys 'model' and 'model_config')")
    return ckpt


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
