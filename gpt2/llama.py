"""The Llama family in plain PyTorch: RMSNorm, RoPE on Q and K, grouped-query
attention, SwiGLU MLP, no biases (SmolLM2-135M is one: gpt2/pretrained.py).
Two Hugging Face families of the same shape load into it: Qwen2 (biases on
the q, k and v projections) and Mistral (a sliding window of attention,
which equals full attention up to its length: the context is held within it).

Module names follow Hugging Face's LlamaForCausalLM, so its state dict loads
key for key. As in gpt2/model.py, every attention calls its layer's V-cache
method, `self_attn.vcache` (lib/vcache.py), built from LlamaConfig.v_cache:
q (B, n_head, T, hs) and k, v (B, n_kv_head, T, hs), K rotated by position
and V not, so a V codec sees V as the cache stores it. Query head h reads
KV head h // (n_head // n_kv_head), Hugging Face's repeat_kv order.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.lm import CausalLM, attend
from lib.vcache import build_method, full_record


@dataclass
class LlamaConfig:
    # defaults: SmolLM2-135M
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3  # query heads share KV heads in groups of n_head // n_kv_head
    n_embd: int = 576
    intermediate_size: int = 1536
    block_size: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections
    sliding_window: int = None  # Mistral: attention over the last so many tokens; block_size stays within it
    dropout: float = 0.0
    # the V-cache method of every attention layer: a lib.vcache record
    v_cache: dict = field(default_factory=full_record)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, ndim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x):
        # in float32 whatever the input dtype, as Hugging Face's Llama: the mean of squares overflows in fp16
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin of each position's rotation angles (T, hs), the halves of a
    head rotated as pairs (i, i + hs/2): Hugging Face's rotate_half layout."""

    def __init__(self, head_dim, theta):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived from the config, not a weight

    def forward(self, positions, dtype):
        angles = positions.float()[:, None] * self.inv_freq  # (T, hs/2), in float32 at any position
        emb = torch.cat((angles, angles), dim=-1)  # (T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, h, T, hs) rotated by its positions' angles, cos and sin (T, hs)."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        hs = config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=False)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hs
        self.vcache = build_method(config.v_cache, config.block_size, hs)

    def forward(self, x, rope, cache=None, pos=None):
        B, T, C = x.size()
        cos, sin = rope
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(self, q, k, v, cache, pos)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, nh * hs)
        return self.resid_dropout(self.o_proj(y))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, rope, cache=None, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    family, config_class = "llama", LlamaConfig

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.model.embed_tokens.weight = self.lm_head.weight
        config.v_cache = self.model.layers[0].self_attn.vcache.record()  # every setting, defaults filled in
        self.apply(self._init_weights)

    def attentions(self):
        return [block.self_attn for block in self.model.layers]

    def forward(self, idx, targets=None, caches=None, last_only=False, pos=None):
        """(logits, loss) as GPT.forward, with the same caches, last_only and pos:
        RoPE rotates Q and K at their positions, from caches.length on."""
        x = self.model.drop(self.model.embed_tokens(idx))  # (B, T, C)
        rope = self.rotary(self.positions(idx, caches, pos), x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, rope, None if caches is None else caches.layers[i], pos)
        return self.head(x, self.model.norm, targets, last_only)

    def v_projections(self):
        """Per layer, (module, fn): v_proj, whose output (B, T, nkv * hs) is V
        (RoPE leaves V alone), and fn(output) -> V rows (n, head_dim)."""
        def v_rows(output):
            return output.reshape(-1, self.config.head_dim)
        return [(attn.v_proj, v_rows) for attn in self.attentions()]

    # ---- weights -------------------------------------------------------------

    @classmethod
    def from_hf_model(cls, hf, **overrides):
        """Our Llama with the weights of a Hugging Face LlamaForCausalLM, Qwen2ForCausalLM
        or MistralForCausalLM; ValueError naming what else it would need."""
        c = hf.config
        kind = c.model_type
        hs = c.hidden_size // c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        window = getattr(c, "sliding_window", None) if kind == "mistral" else None
        expected = [("head_dim", getattr(c, "head_dim", hs) or hs, hs), ("hidden_act", c.hidden_act, "silu"),
                    ("rope_type", rope.get("rope_type", "default"), "default")]
        if kind == "llama":
            expected += [("attention_bias", c.attention_bias, False), ("mlp_bias", c.mlp_bias, False)]
        if kind == "qwen2":
            expected += [("use_sliding_window", c.use_sliding_window, False)]
        problems = [f"{name} is {value!r}, expected {want!r}" for name, value, want in expected if value != want]
        settings = dict(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                        n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size,
                        intermediate_size=c.intermediate_size,
                        block_size=min(c.max_position_embeddings, window or c.max_position_embeddings),
                        rope_theta=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
                        rms_norm_eps=c.rms_norm_eps, tie_embeddings=c.tie_word_embeddings,
                        qkv_bias=kind == "qwen2", sliding_window=window)
        settings.update(overrides)
        if window is not None and settings["block_size"] > window:
            problems.append(f"block_size {settings['block_size']} exceeds its sliding window of {window} tokens, "
                            f"beyond which its attention is not implemented here: use a block_size <= {window}")
        if problems:
            raise ValueError(f"this {kind} differs from what gpt2/llama.py implements: {'; '.join(problems)}")
        model = cls(LlamaConfig(**settings))
        model.load_hf_state_dict(hf.state_dict())
        return model
