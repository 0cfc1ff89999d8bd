"""What every language model of the project shares, whatever its family.

GPT (gpt2/model.py) and Llama (gpt2/llama.py) subclass CausalLM. A subclass
gives `config` (block_size, n_layer, n_head, head_dim, v_cache), `lm_head`,
`attentions()` (its attention modules in layer order, each holding its
V-cache method as `.vcache`), `v_projections()` and
`forward(idx, targets=None, caches=None, last_only=False, pos=None)`.
CausalLM gives the rest: the V-cache method's faces that the calibrator,
the trainer and the benchmark use, decoding through a KV cache, sampling.
"""

import time
from dataclasses import fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.kv_cache import KVCache, static_address
from lib.vcache import build_method, describe


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


def attend(attn, q, k, v, cache=None, pos=None):
    """An attention module's output through its V-cache method `attn.vcache`:
    the method over the whole sequence, or its cache (made by
    attn.vcache.make_cache()) for the new tokens, or that cache's fixed-shape
    step at position pos (a tensor: CausalLM.decode_step)."""
    if pos is not None:
        return cache.step(q, k, v, pos)
    if cache is not None:
        return cache(q, k, v)
    return attn.vcache.attend(q, k, v, dropout_p=attn.attn_dropout if attn.training else 0.0)


class CausalLM(nn.Module):
    """A subclass names its `family` (what checkpoints record) and its `config_class`."""

    family = None
    config_class = None

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """Rebuild the model a checkpoint of this family holds, with everything its
        run used (gpt2.pretrained.model_from_checkpoint takes either family)."""
        return cls.from_checkpoint_state(load_checkpoint(path, map_location))

    @classmethod
    def from_checkpoint_state(cls, ckpt):
        """The same, from a checkpoint dict already loaded (see load_checkpoint)."""
        family = ckpt.get("model_family", "gpt2")  # checkpoints that record none are GPT-2's
        if family != cls.family:
            raise ValueError(f"the checkpoint holds a {family} model, not a {cls.family} one")
        model = cls(cls.config_from_checkpoint(ckpt))
        model.load_state_dict(cls.state_from_checkpoint(ckpt, model))
        return model

    @classmethod
    def config_from_checkpoint(cls, ckpt):
        """The config a checkpoint of this family was trained with; a field this
        version does not know is an error naming it."""
        saved = dict(ckpt["model_config"])
        known = {f.name for f in fields(cls.config_class)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(f"checkpoint's model_config has fields this version does not know: {unknown} "
                             f"(expected {sorted(known)})")
        return cls.config_class(**saved)

    @classmethod
    def state_from_checkpoint(cls, ckpt, model):
        """The state_dict to load from a checkpoint into `model`."""
        return ckpt["model"]

    def attentions(self):
        """The attention modules, in layer order; each holds its method as .vcache."""
        raise NotImplementedError

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Trainable parameters. A tied token embedding counts once, as the head's
        weights (nanoGPT); a family with position embeddings drops them when
        non_embedding."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def positions(self, idx, caches, pos):
        """The positions (T,) of idx (B, T): from caches.length on, or pos itself."""
        if pos is not None:
            return pos
        T = idx.size(1)
        start = caches.length if caches is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        return torch.arange(start, start + T, dtype=torch.long, device=idx.device)

    def head(self, x, norm, targets, last_only):
        """(logits, loss) from the last hidden states x (B, T, C) through the final
        norm and the LM head; logits of the last position alone with last_only."""
        logits = self.lm_head(norm(x[:, -1:] if last_only else x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hf_weight(self, name, tensor):
        """A Hugging Face tensor in the layout of our parameter `name` (as it is,
        unless a family's layout differs)."""
        return tensor

    def load_hf_state_dict(self, sd_hf):
        """Copy a Hugging Face model's weights in, key for key; the V-cache
        methods' state is ours alone."""
        sd = self.state_dict()
        keys = [k for k in sd if ".vcache." not in k]
        missing = [k for k in keys if k not in sd_hf]
        if missing:
            raise ValueError(f"Hugging Face state dict lacks {len(missing)} keys, e.g. {missing[:3]}")
        with torch.no_grad():
            for k in keys:
                src = self.hf_weight(k, sd_hf[k])
                if src.shape != sd[k].shape:
                    raise ValueError(f"shape mismatch for {k}: ours {tuple(sd[k].shape)}, HF {tuple(src.shape)}")
                sd[k].copy_(src)

    # ---- the V-cache method --------------------------------------------------

    def set_v_cache(self, record):
        """Put the method of `record` (a lib.vcache record) into every attention
        layer, unfitted (the calibrator fits a codec that needs it)."""
        device = self.lm_head.weight.device
        for attn in self.attentions():
            attn.vcache = build_method(record, self.config.block_size, self.config.head_dim).to(device)
        self.config.v_cache = self.attentions()[0].vcache.record()

    def v_codecs(self):
        """Every layer's V codec, in layer order."""
        return [attn.vcache.codec for attn in self.attentions()]

    def needs_fit(self):
        """True while some layer's method waits for the fit its codec needs."""
        return any(attn.vcache.needs_fit for attn in self.attentions())

    def crop_block_size(self, block_size):
        """Use a shorter context than the loaded weights were trained with (nanoGPT)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        fitted = [codec.state_dict() for codec in self.v_codecs()]
        self.set_v_cache(self.config.v_cache)  # budgets follow block_size; fitted codecs stay fitted
        for codec, state in zip(self.v_codecs(), fitted):
            codec.load_state_dict(state)

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation (PaLM appendix B), as in nanoGPT."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak_flops

    # ---- generation with a KV cache ----------------------------------------

    def make_cache(self):
        """One decode cache per layer, each made by that layer's method."""
        attentions = self.attentions()
        return KVCache(len(attentions), lambda i: attentions[i].vcache.make_cache())

    def _decode_step(self, idx, cache, pos):
        """Logits (B, 1, vocab) of one new token per sequence at position pos, through the
        cache, and the cache's bookkeeping of that token (KVCache.step_done): one graph."""
        logits = self(idx, caches=cache, last_only=True, pos=pos)[0]
        cache.step_done(pos)
        return logits

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
            cache.advance(booked=True)
            return logits.clone() if cuda else logits  # the next replay overwrites a CUDA graph's output

        return step

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, compile=False, timings=None, cache=None,
                 on_token=None):
        """Sample max_new_tokens after idx (B, T), decoding through a KV cache.

        The cache holds what the model's V-cache method stores: only kept
        tokens (with pruning) and as the k-dim latent (with KVSplice), for
        example. When the context reaches block_size, the cache is emptied
        and refilled from the last block_size // 2 tokens (its buffers are
        reused). compile=True runs each one-token step as one compiled graph
        (decode_step; on CUDA, a CUDA graph); the prompt's prefill runs
        eager. A `timings` dict receives prefill_s (the prompt) and decode_s
        (the new tokens), and the cache's nbytes() after the prompt and at the
        end (cache_after_prompt, cache_at_end: what its tensors hold). Each
        token is drawn by sample_next; on_token(idx_next (B, 1)) sees each as it
        is drawn. `cache`, an empty KVCache from make_cache(), is decoded
        through instead of a new one, so the caller can read what it holds afterwards.
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
        after_prompt = cache.nbytes() if timings is not None else None
        for _ in range(max_new_tokens):
            idx_next = sample_next(logits[:, -1, :], temperature, top_k)
            idx = torch.cat((idx, idx_next), dim=1)
            if on_token is not None:
                on_token(idx_next)
            if cache.length >= bs:
                cache.reset()
                logits, _ = self(idx[:, -(bs // 2):], caches=cache, last_only=True)
            else:
                logits = step(idx_next, cache)
        if timings is not None:
            wait()
            timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, cache_after_prompt=after_prompt,
                           cache_at_end=cache.nbytes())
        return idx


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
