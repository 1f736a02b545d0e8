"""
Qwen3 from scratch: the model, its data, training, sampling and command line in one file.

Qwen3 (Qwen Team, 2025, "Qwen3 Technical Report") is LLaMA (llama.py) with three changes, the
first shared by many recent models (OLMo 2, Gemma 3), as transformers' Qwen3ForCausalLM computes
them:

  - QK-norm: an RMSNorm over each head's query and key, after q_proj and k_proj and before
    RoPE. It bounds the attention logits, so that a high learning rate does not blow up the
    softmax (see CausalSelfAttention).
  - head_size is a field of its own: n_head * head_size may differ from n_embd
    (Qwen3-0.6B: 16 heads of 128 on a width of 1024).
  - rope_theta 1e6; the small models tie the head to the token embedding (--tie-embeddings).

    python qwen3.py train                  # tokenizer, encoded corpus, then training
    python qwen3.py sample --prompt "Мой дядя"

Ctrl-C saves a checkpoint that `train --resume` continues; `eval` scores one;
`--init-from DIR` runs Hugging Face's Qwen3 folders, text in and out
(Qwen3-0.6B to 32B); `export` writes ours as one.
"""

import argparse
import csv
import json
import math
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import bpe

# Stored in every checkpoint; checkpoints of other models are refused.
MODEL = "qwen3"

# -----------------------------------------------------------------------------
# Config


def arg(default, help, **metadata):
    """A config field; its command-line flag takes this help (and type, if given)."""
    return field(default=default, metadata=dict(help=help, **metadata))


def check(ok, message):
    """Raise ValueError(message) unless ok: the one-line error that a user sees."""
    if not ok:
        raise ValueError(message)


# The fields of Llama 3's RoPE scaling (llama3_scaling).
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")


@dataclass
class Qwen3Config:
    """The shape of the network. Qwen3-0.6B is Qwen3Config(151936, 40960, 28, 16, 1024, 128,
    0.0, 1e-6, 8, 1e6, mlp_hidden=3072, tie_embeddings=True)."""

    vocab_size: int = arg(3000, "tokens in the vocabulary (a new run's BPE gets this size)")
    block_size: int = arg(256, "context length: the most tokens the model sees at once")
    n_layer: int = arg(6, "Transformer blocks")
    n_head: int = arg(8, "attention heads per block")
    n_embd: int = arg(256, "width of the residual stream")
    head_size: int | None = arg(None, "width of each head; n_head * head_size may "
                                "differ from n_embd (None: n_embd // n_head)")
    dropout: float = arg(0.0, "dropout on embeddings, attention weights and residual branches")
    norm_eps: float = arg(1e-5, "added to the mean square in RMSNorm, against division by ~0")
    n_kv_head: int = arg(4, "key/value heads, each shared by n_head // n_kv_head query "
                         "heads (1: multi-query)")
    rope_theta: float = arg(1e6, "RoPE's base: the slowest pair of features turns "
                            "~1 / rope_theta per position")
    rope_scaling: dict | None = arg(None, "Llama 3's RoPE scaling (llama3_scaling's "
                                    "arguments, as JSON)", type=json.loads)
    multiple_of: int = arg(64, "the MLP's hidden width is rounded up to a multiple of this")
    mlp_hidden: int | None = arg(None, "the MLP's hidden width (None: 8/3 * n_embd, rounded up "
                                 "to multiple_of)")
    tie_embeddings: bool = arg(False, "share one matrix between the token embedding and the "
                               "head, as GPT-2")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head",
                     "multiple_of"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1,
                  f"{name} must be a positive integer, got {value!r}")
        # LLaMA's: the width split among the heads.
        if self.head_size is None:
            check(self.n_embd % self.n_head == 0,
                  f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_size = self.n_embd // self.n_head
        value = self.head_size
        check(isinstance(value, int) and value >= 1 and value % 2 == 0,
              "head_size must be a positive even integer (RoPE turns pairs), "
              f"got {value!r}")
        check(self.n_head % self.n_kv_head == 0,
              f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        check(1 < self.rope_theta < math.inf,
              f"rope_theta must be finite and greater than 1, got {self.rope_theta}")
        scaling = self.rope_scaling
        if scaling is not None:
            check(isinstance(scaling, dict) and sorted(scaling) == sorted(LLAMA3_SCALING),
                  f"rope_scaling must give {', '.join(LLAMA3_SCALING)}")
            check(scaling["low_freq_factor"] < scaling["high_freq_factor"],
                  "rope_scaling's low_freq_factor must be below its high_freq_factor")
        # LLaMA's: 2/3 of GPT-2's 4 * n_embd, as SwiGLU has 3 matrices to its 2.
        if self.mlp_hidden is None:
            hidden = int(8 * self.n_embd / 3)
            self.mlp_hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)
        value = self.mlp_hidden
        check(isinstance(value, int) and value >= 1,
              f"mlp_hidden must be a positive integer, got {value!r}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")


# -----------------------------------------------------------------------------
# Model

# The fused SiLU and attention kernels; the tests switch them off to check they equal ours.
FUSED = True


def silu(x):
    """SiLU (Elfwing et al., 2017), or Swish (Ramachandran et al., 2017): x * sigmoid(x),
    SwiGLU's gate."""
    return x * torch.sigmoid(x)


class RMSNorm(nn.Module):
    """Root mean square normalisation (Zhang and Sennrich, 2019): LayerNorm without
    re-centring or bias."""

    def __init__(self, n_embd, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):
        # In float32 even under bfloat16 autocast: a mean of squares.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE; Su et al., 2021): a query or key at position m turns
    its feature pair i by m * theta_i, theta_i = rope_theta^(-2i / head_size). Turning by m,
    then back by n, is turning by m - n: the score q_m . k_n depends on m - n only, and
    nothing is learned."""

    def __init__(self, config):
        super().__init__()
        head_size = config.head_size
        pairs = torch.arange(0, head_size, 2, dtype=torch.float64)
        inv_freq = config.rope_theta ** (-pairs / head_size)  # (hs / 2,)
        if config.rope_scaling:
            inv_freq = llama3_scaling(inv_freq, **config.rope_scaling)
        positions = torch.arange(config.block_size, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)  # (block_size, hs / 2)
        # (block_size, head_size): features i and i + hs / 2 pair up.
        angles = torch.cat([angles, angles], dim=-1)
        # Not persistent: no checkpoint needs it.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, start, T):
        """cos and sin (T, head_size) of the angles of positions start, ..., start + T - 1."""
        return self.cos[start : start + T], self.sin[start : start + T]


def llama3_scaling(inv_freq, factor, low_freq_factor, high_freq_factor,
                   original_max_position_embeddings):
    """Llama 3's RoPE scaling (Meta's llama-models, apply_scaling; rope_type "llama3"):
    to stretch a context of original_max_position_embeddings, the pairs that turn once
    in over context / low_freq_factor positions turn `factor` times slower, those that
    turn in under context / high_freq_factor keep their speed, and a ramp runs between.
    inv_freq: (hs / 2,) in and out."""
    wavelength = 2 * math.pi / inv_freq
    # 0 for the slow pairs, 1 for the fast ones: the share of the old speed kept.
    ramp = original_max_position_embeddings / wavelength - low_freq_factor
    kept = (ramp / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return kept * inv_freq + (1 - kept) * inv_freq / factor


def apply_rope(x, cos, sin):
    """x (B, heads, T, head_size), each feature pair (x1, x2) turned: (x1 cos - x2 sin,
    x2 cos + x1 sin). Which features pair up is a convention, the same model up to the order
    of q_proj's and k_proj's rows (evens, then odds: Hugging Face's conversion of Meta's).
        Meta's code:          (x0 x1) (x2 x3) (x4 x5) (x6 x7)   neighbours, as complex numbers
        Hugging Face's, ours: x0 x1 x2 x3 | x4 x5 x6 x7        "rotate half": x0 with x4, ..."""
    x1, x2 = x.chunk(2, dim=-1)  # each (B, heads, T, head_size / 2)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (B, heads, T, head_size)


def attention(q, k, v, dropout_p=0.0):
    """Masked scaled dot-product attention, softmax(q k^T / sqrt(head_size)) v, for the
    queries q (B, n_head, T, head_size) of the last T of the T_k positions whose keys and
    values k, v (B, n_head, T_k, head_size) hold: query i sees keys 0 .. T_k - T + i."""
    T = q.size(-2)
    T_k = k.size(-2)
    # One kernel: the causal mask, or none for one new token (all of generation).
    if FUSED and T in (1, T_k):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
    causal = torch.ones(T, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T)
    att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, n_head, T, T_k)
    att = F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
    # GPT-2's attention dropout: on the weights.
    att = F.dropout(att, dropout_p)
    return att @ v  # (B, n_head, T, head_size)


class KVCache:
    """The keys and values of the tokens so far, per layer, of the shared heads only, in
    buffers (B, n_kv_head, block_size, head_size) written in place; the next tokens go to
    positions pos, ..."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0

    def update(self, layer, k, v):
        """Store a layer's k, v (B, n_kv_head, T, head_size) at pos and return all so far
        (B, n_kv_head, pos + T, head_size); Qwen3.forward advances pos once every layer has
        stored."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Masked grouped-query self-attention (Ainslie et al., 2023): each group of
    n_head / n_kv_head query heads shares a key and value head (n_kv_head = n_head: GPT-2's
    multi-head; 1: multi-query), turned by RoPE. The heads are head_size wide whatever n_embd
    is: o_proj maps n_head * head_size back to n_embd.

    QK-norm (Dehghani et al., 2023; Wortsman et al., 2023): each head's query and key are
    RMS-normalised before RoPE, with a learned gain per feature. A score q . k grows with the
    norms of q and k, which nothing else bounds: at a high learning rate a few logits grow
    large, the softmax puts all its weight on one key, and training stalls or diverges.
    Normalised, a score is bounded by the gains and sqrt(head_size). Gemma 2 capped the logits
    with a tanh (soft-capping) for the same reason; Gemma 3 switched to QK-norm. Qwen2 had
    biases on q, k and v, for long contexts; Qwen3 has none."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.dropout = config.dropout
        self.layer = layer  # which layer of a KVCache is ours
        kv_width = config.n_kv_head * config.head_size
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_size, bias=False)
        self.k_proj = nn.Linear(config.n_embd, kv_width, bias=False)
        self.v_proj = nn.Linear(config.n_embd, kv_width, bias=False)
        # joined heads -> residual stream
        self.o_proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.o_proj.residual_projection = True  # GPT-2's scaled init: see _init_weights
        # One gain per feature of a head, shared by the heads.
        self.q_norm = RMSNorm(config.head_size, config.norm_eps)
        self.k_norm = RMSNorm(config.head_size, config.norm_eps)

    def forward(self, x, rope, kv_cache=None):
        B, T, C = x.size()  # batch, tokens, n_embd
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, -1).transpose(1, 2)  # (B, n_kv_head, T, hs)
        # QK-norm, over each head's features.
        q = self.q_norm(q)
        k = self.k_norm(k)
        v = self.v_proj(x).view(B, T, self.n_kv_head, -1).transpose(1, 2)  # (B, n_kv_head, T, hs)
        # Turned by their positions; v is not.
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            # (B, n_kv_head, T_k, head_size): the cached keys and values, then the new ones
            k, v = kv_cache.update(self.layer, k, v)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, T_k, hs)
        v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, T_k, hs)
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, dropout)  # (B, n_head, T, head_size)
        # (B, T, n_head * head_size): heads side by side
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return F.dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """The position-wise feed-forward network as a SwiGLU (Shazeer, 2020):
    down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.down_proj.residual_projection = True  # GPT-2's scaled init: see _init_weights
        self.dropout = config.dropout

    def forward(self, x):
        gate = self.gate_proj(x)  # (B, T, mlp_hidden)
        # How much of up(x) passes, feature by feature.
        gate = F.silu(gate) if FUSED else silu(gate)
        x = self.down_proj(gate * self.up_proj(x))  # (B, T, n_embd)
        return F.dropout(x, self.dropout, self.training)


class Block(nn.Module):
    """One Transformer layer, Pre-norm as GPT-2's: x + Attn(RMSNorm(x)), then
    x + MLP(RMSNorm(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = CausalSelfAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache)  # (B, T, n_embd)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, n_embd)


def check_sampling(temperature, top_k, top_p):
    """Raise ValueError for a temperature, top_k or top_p out of range."""
    check(0 <= temperature < math.inf,
          f"temperature must be >= 0 (0 is greedy) and finite, got {temperature}")
    check(top_k is None or top_k >= 1, f"top_k must be at least 1, got {top_k}")
    check(top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """The next token (B, 1) from the last logits (B, vocab_size): greedy at temperature 0,
    else drawn from softmax(logits / temperature) among the top_k likeliest and, of those,
    the fewest holding top_p of the probability."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # The likeliest at 0, so that near temperature 0 the others go to -inf, never NaN;
    # and a float32 temperature of 1e-39 would be 0, hence the smallest positive float.
    logits = logits - logits.max(dim=-1, keepdim=True).values
    logits = logits / max(temperature, torch.finfo(logits.dtype).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once those before it hold top_p; the first always stays.
        held_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        dropped = held_before >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(dropped, 0.0))
    return torch.multinomial(probs, num_samples=1)


class Qwen3(nn.Module):
    """The language model: a token embedding, n_layer blocks, a final RMSNorm, and a head that
    turns each position's vector into logits over the next token. Positions enter only as
    RoPE's turns."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            rotary_emb=RotaryEmbedding(config),  # no weights: the angles of each position
            layers=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tied as GPT-2's, or LLaMA's own head: vocab_size * n_embd parameters, little at 7B.
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """GPT-2's, kept: N(0, 0.02) weights; std / sqrt(2 * n_layer) for the residual
        projections, as the stream sums 2 * n_layer of their outputs (Meta's and Hugging Face's
        init leave that scaling out)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if hasattr(module, "residual_projection"):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self):
        """Parameters to train; the tied head and token embedding count once."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, folder):
        """Qwen3 from a Hugging Face folder: see "Pretrained weights" below."""
        return load_pretrained_weights(cls(config_from_pretrained(folder)), folder).eval()

    def forward(self, idx, targets=None, kv_cache=None):
        """Logits (B, T, vocab_size) for the token ids idx (B, T), and, given targets
        (B, T), the mean cross-entropy loss (else None). With a kv_cache, idx are the
        tokens after the cached ones, at positions kv_cache.pos, kv_cache.pos + 1, ..."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.pos
        check(start + T <= self.config.block_size,
              f"{start + T} tokens exceed the context of {self.config.block_size}")
        # cos, sin (T, head_size): the turns of positions start, ..., start + T - 1
        rope = self.model.rotary_emb(start, T)
        x = self.model.embed_tokens(idx)  # (B, T, n_embd)
        x = F.dropout(x, self.config.dropout, self.training)
        for block in self.model.layers:
            x = block(x, rope, kv_cache)  # (B, T, n_embd)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True):
        """idx (B, T) extended by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache)
        return torch.cat([idx, *new], dim=1)

    @torch.inference_mode()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               use_cache=True):
        """Yield max_new_tokens new tokens (B, 1) as they are sampled. Without the cache each
        step runs the whole window; with it (room for this text, not the whole context), the
        first fills the cache and the others run one token.

        Past block_size the window slides: from the second layer on, each cached key and value
        depends on the token that just left (though not its position: RoPE's scores are
        relative). So it is re-filled from the window at each step, as slow as no cache but exact.
        """
        check(max_new_tokens >= 0, f"max_new_tokens must not be negative, got {max_new_tokens}")
        B, T = idx.size()
        check(T > 0, "generation needs at least one token to start from")
        kv_cache = None
        if use_cache:
            size = min(self.config.block_size, T + max_new_tokens)
            kv_cache = KVCache(replace(self.config, block_size=size), B, idx.device,
                               self.lm_head.weight.dtype)
        # Only the window is kept, so that a huge max_new_tokens means "until Ctrl-C".
        window = idx[:, -self.config.block_size :]  # (B, <= block_size)
        for t in range(T, T + max_new_tokens):  # t: tokens so far
            cached = kv_cache is not None and kv_cache.pos == t - 1
            if cached and t <= self.config.block_size:
                x = window[:, -1:]  # (B, 1): the rest is cached
            else:
                x = window  # (B, <= block_size)
                if kv_cache is not None:
                    kv_cache.pos = 0  # fill (or re-fill: see above) from the window
            logits, _ = self(x, kv_cache=kv_cache)  # (B, T_x, vocab_size)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
            window = torch.cat([window, next_id], dim=1)[:, -self.config.block_size :]
            yield next_id


# -----------------------------------------------------------------------------
# Data


def load_tokens(path):
    """bpe.prepare_corpus's .bin file as a 1-D uint16 tensor."""
    return torch.from_file(str(path), dtype=torch.uint16, size=Path(path).stat().st_size // 2)


def get_batch(tokens, batch_size, block_size, generator, rank=0, world_size=1):
    """Random windows x (B, block_size) and targets y, one token on. Each process takes its
    row of one draw, so the generators stay in step."""
    starts = torch.randint(len(tokens) - block_size, (world_size, batch_size),
                           generator=generator)
    ours = starts[rank]  # (B,)
    offsets = torch.arange(block_size + 1)  # (block_size + 1,)
    window = tokens[ours[:, None] + offsets].long()  # (B, block_size + 1)
    return window[:, :-1], window[:, 1:]


def sequential_batches(tokens, batch_size, block_size):
    """get_batch's (x, y), predicting every token once, in order."""
    end = (len(tokens) - 1) // block_size * block_size  # of the full windows
    x = tokens[:end].long().view(-1, block_size)
    y = tokens[1 : end + 1].long().view(-1, block_size)
    for first in range(0, len(x), batch_size):
        yield x[first : first + batch_size], y[first : first + batch_size]
    rest = tokens[end:].long()
    if len(rest) > 1:
        yield rest[None, :-1], rest[None, 1:]


# -----------------------------------------------------------------------------
# Training

# Set by torchrun (DDP).
RANK = int(os.environ.get("RANK", 0))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))


def duration(text):
    """'90s', '30m', '1.5h' or a number of seconds, in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


@dataclass
class TrainConfig:
    """How to train."""

    data: str = field(default_factory=bpe.default_data_dir,
                      metadata=dict(help="UTF-8 .txt novels: a folder or a file"))
    out_dir: str = arg(f"checkpoints/{MODEL}",
                       "the run's folder: tokenizer, token arrays, ckpt.pt, log.csv")
    batch_size: int = arg(32, "sequences per batch (per process under torchrun)")
    lr: float = arg(3e-3, "peak learning rate, after warmup")
    warmup_iters: int = arg(200, "steps of linear warmup")
    max_iters: int = arg(900, "optimizer steps: ~30 minutes on 2 CPU cores")
    weight_decay: float = arg(0.1, "AdamW's weight decay, on weight matrices only")
    grad_clip: float = arg(1.0, "clip gradients to this global norm (0: off)")
    eval_interval: int = arg(100, "steps between evaluations and checkpoints")
    eval_iters: int = arg(10, "batches per split per evaluation")
    max_time: float | None = arg(None, "a time budget instead of max_iters: 90s, 30m, 1h",
                                 type=duration)
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps, ... (auto: an accelerator if any)")
    dtype: str = arg("auto", "bfloat16 or float32 matmuls (auto: bfloat16 where supported)")
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(False, "continue the run in out_dir")
    init_from: str | None = arg(None, "a Hugging Face Qwen3 folder to start from")

    def __post_init__(self):
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1,
                  f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_iters", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            check(value >= 0, f"{name} must not be negative, got {value}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(self.max_time is None or 0 < self.max_time < 1e9,
              f"max_time must be in (0s, 1e9s), got {self.max_time}")
        check(self.dtype in ("auto", "bfloat16", "float32"),
              f"dtype {self.dtype!r} is not auto, bfloat16 or float32")


def configure_optimizer(model, cfg, device):
    """AdamW (Loshchilov and Hutter, 2019) with GPT-3's betas, decaying only weight
    matrices: biases and norm gains should not shrink."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": cfg.weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))


def get_lr(step, cfg, elapsed=0.0):
    """Learning rate at step (0-based): linear warmup to cfg.lr, then cosine decay to
    cfg.lr / 10 at max_iters, or where the time budget ends at the pace so far."""
    max_iters = step / elapsed * cfg.max_time if cfg.max_time and elapsed > 0 else cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    decay_iters = max(1, max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / decay_iters)  # 0 -> 1
    min_lr = cfg.lr / 10
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def train_step(model, optimizer, x, y, grad_clip, autocast):
    """One optimizer step on x, y (B, T); the loss, on the device. DDP's backward()
    averages the gradients."""
    with autocast:
        _, loss = model(x, y)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model, batches, char_counts, device, autocast=nullcontext()):
    """Mean loss per token (nats) and bits per character over batches of (x, y), in all
    processes; char_counts (vocab_size,): each token's characters."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, characters
    for x, y in batches:
        with autocast:
            logits, _ = model(x.to(device))
        y = y.to(device)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        totals[1] += y.numel()
        totals[2] += char_counts[y].sum()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    nats, n_tokens, n_chars = totals.tolist()
    bpc = nats / math.log(2) / n_chars if n_chars else float("nan")
    return nats / n_tokens, bpc


@dataclass
class Run:
    """A run in training, as its checkpoint keeps it."""

    model: nn.Module  # not compiled or wrapped
    optimizer: torch.optim.Optimizer
    tok: bpe.Tokenizer
    batches: torch.Generator  # draws the training batches
    step: int = 0
    elapsed: float = 0.0  # seconds trained, in all sessions


def save_checkpoint(path, run, max_time=None):
    """Write all that --resume needs, atomically, as plain data."""
    checkpoint = {
        "model": MODEL,
        "config": asdict(run.model.config),
        "tokenizer": run.tok.fingerprint,
        "step": run.step,
        "weights": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "elapsed": run.elapsed,
        "max_time": max_time,
        "rng": {"torch": torch.get_rng_state(), "batches": run.batches.get_state()},
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """The model, tokenizer and checkpoint dict of the run at path (ckpt.pt, tokenizer.json
    beside it)."""
    check(path.is_file(),
          f"no checkpoint at {path}: train one first with `python {MODEL}.py train`")
    # Plain data only: no code runs from the file.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, foreign, ...
        raise ValueError(f"{path} is corrupt or not a checkpoint: it cannot be read") from None
    kind = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    check(kind, f"{path} is no checkpoint")
    check(kind == MODEL, f"{path} is a checkpoint of {kind}, not of {MODEL}")
    missing = {"config", "tokenizer", "step", "weights", "optimizer", "rng"} - checkpoint.keys()
    check(not missing, f"{path} is corrupt: it lacks {', '.join(sorted(missing))}")
    tok = bpe.Tokenizer.load(path.parent / "tokenizer.json")
    check(checkpoint["tokenizer"] == tok.fingerprint,
          f"{path} was trained with another tokenizer.json")
    try:
        model = Qwen3(Qwen3Config(**checkpoint["config"]))
        model.load_state_dict(checkpoint["weights"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt: its weights do not fit its config ({e})") from None
    check(all(p.isfinite().all() for p in model.parameters()),
          f"{path} holds NaN or inf weights: its run diverged")
    return model, tok, checkpoint


def restore(run, checkpoint, path):
    """Continue run from its checkpoint."""
    ours = asdict(run.model.config)
    theirs = checkpoint["config"]
    differ = ", ".join(name for name in ours if theirs.get(name) != ours[name])
    check(not differ, f"{path} has another shape ({differ}): give the same flags to resume")
    run.model.load_state_dict(checkpoint["weights"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    run.batches.set_state(checkpoint["rng"]["batches"])
    run.step = checkpoint["step"]
    run.elapsed = checkpoint.get("elapsed", 0.0)


def pick_device(name, local_rank=0):
    """torch.device for --device."""
    kinds = ["cpu"]
    if torch.accelerator.is_available():
        kinds.append(torch.accelerator.current_accelerator().type)
    if name == "auto":
        name = kinds[-1]
    check(name.split(":")[0] in kinds, f"no device {name!r} here: use auto or {', '.join(kinds)}")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def use_bfloat16(device, dtype):
    """Whether to use bfloat16 matmuls."""
    if dtype != "auto":
        return dtype == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(False)
    cpu = torch.cpu.get_capabilities()
    return device.type == "cpu" and bool(cpu.get("avx512_bf16") or cpu.get("amx_bf16"))


@contextmanager
def ctrl_c_stops():
    """Ctrl-C makes the yielded list non-empty: stop after this step and save."""
    stop = []

    def request_stop(*signal_args):
        if stop:
            signal.default_int_handler(*signal_args)  # raises KeyboardInterrupt
        stop.append(True)
        print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare_data(config, cfg, log):
    """The run's tokenizer, token arrays, and config with the tokenizer's vocab_size."""
    if RANK != 0:
        dist.barrier()
    vocab_size = config.vocab_size
    # A released model brings its own tokenizer.
    if cfg.init_from:
        vocab_size = None
    # A tokenizer made here for this text and size is reused.
    tok, train_path, val_path = bpe.prepare_corpus(cfg.data, cfg.out_dir, vocab_size, log=log,
                                                   resume=cfg.resume)
    if WORLD_SIZE > 1 and RANK == 0:
        dist.barrier()
    splits = {"train": load_tokens(train_path), "val": load_tokens(val_path)}
    for split, tokens in splits.items():
        check(len(tokens) > config.block_size,
              f"the {split} split has {len(tokens)} tokens, too few for a window")
    # A tiny text stops BPE early.
    if not cfg.init_from:
        config = replace(config, vocab_size=tok.vocab_size)
    return config, tok, splits


def evaluate_and_save(model, run, splits, cfg, autocast, lr, tokens_per_s):
    """Evaluate both splits on the same batches each time, so that numbers compare, and log;
    process 0 saves the checkpoint and a log.csv row."""
    block_size = run.model.config.block_size
    char_counts = torch.tensor(run.tok.char_counts(), device=run.model.lm_head.weight.device)
    losses = []
    for tokens in splits.values():
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        batches = (get_batch(tokens, cfg.batch_size, block_size, generator, RANK, WORLD_SIZE)
                   for _ in range(cfg.eval_iters))
        losses += evaluate(model, batches, char_counts, char_counts.device, autocast)
    train_loss, train_bpc, val_loss, val_bpc = losses
    eta = (cfg.max_iters - run.step) * run.elapsed / run.step  # seconds
    if cfg.max_time:
        eta = cfg.max_time - run.elapsed
    if RANK == 0:
        print(f"eval step {run.step}: train loss {train_loss:.4f}, {train_bpc:.3f} bpc | "
              f"val loss {val_loss:.4f}, {val_bpc:.3f} bpc | {tokens_per_s:,.0f} tok/s | "
              f"elapsed {timedelta(seconds=round(run.elapsed))} | "
              f"ETA {timedelta(seconds=round(max(0, eta)))}")
    # The weights may be NaN now: then no save.
    check(all(map(math.isfinite, losses)), f"loss not finite at step {run.step}: try a lower --lr")
    if RANK == 0:
        save_checkpoint(Path(cfg.out_dir) / "ckpt.pt", run, cfg.max_time)
        row = [run.step, lr, *losses, round(tokens_per_s), round(run.elapsed, 1)]
        with open(Path(cfg.out_dir) / "log.csv", "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(row)


def train_loop(run, model, splits, cfg, autocast, log):
    """Train run.model through model (compiled or wrapped) until max_iters, the time budget
    or Ctrl-C."""
    block_size = run.model.config.block_size
    device = run.model.lm_head.weight.device
    first_step = run.step
    elapsed_before = run.elapsed
    start = time.time()
    budget = cfg.max_time or math.inf
    stopping = elapsed_before >= budget  # a budget spent already
    with ctrl_c_stops() as stop:
        while (cfg.max_time or run.step < cfg.max_iters) and not stopping:
            lr = get_lr(run.step, cfg, run.elapsed)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            step_start = time.time()
            x, y = get_batch(splits["train"], cfg.batch_size, block_size, run.batches, RANK,
                             WORLD_SIZE)
            loss = train_step(model, run.optimizer, x.to(device), y.to(device), cfg.grad_clip,
                              autocast)
            run.step += 1
            tokens_per_s = cfg.batch_size * block_size * WORLD_SIZE / (time.time() - step_start)
            elapsed = elapsed_before + time.time() - start
            stopping = bool(stop) or elapsed > budget
            # One process's stop or NaN (a sum keeps it) stops all, lest the rest wait
            # forever. Process 0's clock sets the lr.
            status = torch.tensor([stopping, loss.item() / WORLD_SIZE, elapsed * (RANK == 0)],
                                  device=device)
            if WORLD_SIZE > 1:
                dist.all_reduce(status)
            stopping, loss, run.elapsed = status.tolist()
            # No way back from NaN: the last checkpoint stays.
            check(math.isfinite(loss), f"loss not finite at step {run.step}: try a lower --lr")
            if run.step == first_step + 1 or run.step % 10 == 0:
                progress = f"{run.step}/{cfg.max_iters}"
                if cfg.max_time:
                    progress = f"{run.step} ({run.elapsed:.0f}s of {cfg.max_time:.0f}s)"
                log(f"step {progress} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_s:,.0f} tok/s")
            # Under a time budget, max_iters counts nothing.
            at_end = run.step == cfg.max_iters and not cfg.max_time
            if run.step % cfg.eval_interval == 0 or at_end or stopping:
                evaluate_and_save(model, run, splits, cfg, autocast, lr, tokens_per_s)
    return bool(stop)


def train(config, cfg):
    """Train a Qwen3 of shape `config` on cfg.data into cfg.out_dir; DDP under torchrun."""
    device = pick_device(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    # An out_dir we cannot write fails now, before the BPE.
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=cfg.out_dir).close()
    log = print if RANK == 0 else lambda *args: None
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    # A bad checkpoint fails before any work.
    checkpoint = load_checkpoint(ckpt_path)[2] if cfg.resume else None
    check(cfg.resume or not ckpt_path.exists(),
          f"{ckpt_path} exists: --resume continues it, or use another --out-dir")
    if WORLD_SIZE > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    config, tok, splits = prepare_data(config, cfg, log)
    # The same initial weights in every process.
    torch.manual_seed(cfg.seed)
    raw_model = Qwen3(config).to(device)
    optimizer = configure_optimizer(raw_model, cfg, device)
    run = Run(raw_model, optimizer, tok, torch.Generator().manual_seed(cfg.seed))
    if checkpoint:
        restore(run, checkpoint, ckpt_path)
        # The run's budget, unless given a new one.
        cfg = replace(cfg, max_time=cfg.max_time or checkpoint.get("max_time"))
        log(f"resuming from {ckpt_path} at step {run.step}")
    elif cfg.init_from:
        # Fine-tuning.
        load_pretrained_weights(raw_model, cfg.init_from)
    if not checkpoint and RANK == 0:
        columns = "step,lr,train_loss,train_bpc,val_loss,val_bpc,tokens_per_s,elapsed_s"
        (Path(cfg.out_dir) / "log.csv").write_text(columns + "\n")
    bfloat16 = use_bfloat16(device, cfg.dtype)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bfloat16)
    # run.model stays plain, as checkpoints keep it.
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if WORLD_SIZE > 1:
        model = DistributedDataParallel(model)
    log(f"{MODEL}: {raw_model.num_params() / 1e6:.2f}M parameters, {config}")
    log(f"tokens: {len(splits['train']):,} train, {len(splits['val']):,} val | {device}, "
        f"{'bfloat16' if bfloat16 else 'float32'}, {WORLD_SIZE} process(es)")
    try:
        stopped = train_loop(run, model, splits, cfg, autocast, log)
        if WORLD_SIZE > 1:
            # One process leaving early can abort another.
            dist.barrier()
    finally:
        if WORLD_SIZE > 1:
            dist.destroy_process_group()
    if stopped:
        log(f"stopped by Ctrl-C at step {run.step}: saved {ckpt_path}; --resume continues")
    else:
        log(f"done: {ckpt_path} is at step {run.step}")
    return raw_model


# -----------------------------------------------------------------------------
# Sampling


def load_trained(out_dir, device, init_from=None):
    """The model and tokenizer of the run in out_dir, or of the folder init_from."""
    if init_from:
        model = Qwen3.from_pretrained(init_from)
        tok = pretrained_tokenizer(init_from)
    else:
        model, tok, _ = load_checkpoint(Path(out_dir) / "ckpt.pt")
    return model.to(device).eval(), tok


def cmd_sample(args):
    """`sample`: stream generated text to stdout, the speed to stderr."""
    # Bad flags fail before the model loads.
    check(args.max_new_tokens >= 0,
          f"--max-new-tokens must not be negative, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    check(not (args.prompt and args.prompt_file), "give --prompt or --prompt-file, not both")
    device = pick_device(args.device)
    model, tok = load_trained(args.out_dir, device, args.init_from)
    check(tok or args.prompt_ids,
          "this model has no tokenizer: give --prompt-ids 1 2 3")
    check(not args.prompt_ids or not (args.prompt or args.prompt_file),
          "give --prompt or --prompt-ids, not both")
    prompt = args.prompt or ""
    # Bytes that are not UTF-8 reach argv as lone surrogates (PEP 383).
    check(not any("\udc80" <= c <= "\udcff" for c in prompt),
          "the prompt is not UTF-8, nor perhaps the terminal: use --prompt-file")
    if args.prompt_file:
        prompt = bpe.read_text(args.prompt_file)
    ids = args.prompt_ids or tok.encode_prompt(prompt)
    check(0 <= min(ids) <= max(ids) < model.config.vocab_size,
          f"--prompt-ids must be ids of the model, 0 to {model.config.vocab_size - 1}")
    idx = torch.tensor([ids], device=device)
    torch.manual_seed(args.seed)
    n_tokens = 0
    start = time.time()

    def new_ids():
        nonlocal n_tokens
        for token in model.stream(idx, args.max_new_tokens, args.temperature, args.top_k,
                                  args.top_p, args.cache):
            n_tokens += 1
            id = token.item()  # one sync with the device per token
            if tok and id == tok.eos_id:
                return
            yield id

    # Text, or without a tokenizer the ids.
    if args.prompt_ids:
        prompt = tok.decode(ids) if tok else " ".join(map(str, ids))
    print(prompt, end="")
    if tok:
        pieces = tok.decode_stream(new_ids(), continuing=bool(prompt))
    else:
        pieces = (f" {id}" for id in new_ids())
    for text in pieces:
        print(text, end="", flush=True)
    print()
    print(f"{n_tokens} tokens in {time.time() - start:.2f}s", file=sys.stderr)


# -----------------------------------------------------------------------------
# Pretrained weights: Hugging Face's Qwen3 in, ours out
#
# Hugging Face publishes Qwen3-family models as a folder: config.json (the shape),
# model.safetensors or pytorch_model.bin (the weights) and a tokenizer, which
# bpe.Tokenizer.from_pretrained reads. Our module names and nn.Linear's (out, in) layout
# are theirs: loading is a plain copy.

# Their config.json's keys: ours.
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "block_size",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "hidden_size": "n_embd",
    "rms_norm_eps": "norm_eps",
    "num_key_value_heads": "n_kv_head",
    "rope_theta": "rope_theta",
    "intermediate_size": "mlp_hidden",
    "tie_word_embeddings": "tie_embeddings",
    "head_dim": "head_size",
}
# The config.json settings that this file computes, transformers' default first.
SUPPORTED = {
    "architectures": (["Qwen3ForCausalLM"],),
    "model_type": ("qwen3",),
    "hidden_act": ("silu",),  # SwiGLU's gate
    "attention_bias": (False,),  # biases in the projections
    # Qwen3 may window its last layers; qwen3.py has no window.
    "use_sliding_window": (False,),
}


def config_from_pretrained(folder):
    """The Qwen3Config of a Hugging Face Qwen3 config.json; other models are refused."""
    path = Path(folder) / "config.json"
    hf = bpe.read_json(path)
    for key, computed in SUPPORTED.items():
        values = " or ".join(map(repr, computed))
        check(hf.get(key, computed[0]) in computed,
              f"{path} sets {key} to {hf.get(key)!r}: {MODEL}.py computes {values}")
    scaling = None
    # transformers' key before version 5, and since
    for rope in (hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        check(rope_type in ("default", "llama3"),
              f"{path} asks for RoPE scaling {rope_type!r}, which qwen3.py does not compute")
        if rope_type == "llama3":
            scaling = {key: rope.get(key) for key in LLAMA3_SCALING}
    # transformers' defaults, and version 5's rope_parameters
    defaults = {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "num_key_value_heads": 32,
        "head_dim": 128,
    }
    hf = {**defaults, **hf, **(hf.get("rope_parameters") or {})}
    missing = ", ".join(sorted(CONFIG_KEYS.keys() - hf.keys()))
    check(not missing, f"{path} lacks {missing}")
    try:
        config = Qwen3Config(**{ours: hf[theirs] for theirs, ours in CONFIG_KEYS.items()},
                             rope_scaling=scaling)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def load_pretrained_weights(model, folder):
    """Copy a Hugging Face folder's weights into `model`, of its shape: the same names, a
    tied head perhaps stored once; RoPE's saved frequencies left out."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    paths = [folder / "model.safetensors"]
    if not paths[0].is_file() and index.is_file():
        # A large model's shards.
        weight_map = bpe.read_json(index).get("weight_map")
        check(isinstance(weight_map, dict) and weight_map, f"{index} has no weight_map")
        paths = [folder / shard for shard in sorted(set(map(str, weight_map.values())))]
    elif not paths[0].is_file():
        paths = [folder / "pytorch_model.bin"]
        check(paths[0].is_file(), f"{folder} has no model.safetensors or pytorch_model.bin")
    weights = {}
    for path in paths:
        check(path.is_file(), f"{folder} lacks the shard {path.name}")
        # .bin: plain data only (weights_only), no code run from the file.
        try:
            if path.suffix == ".safetensors":
                part = safetensors.torch.load_file(path)
            else:
                part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # truncated, foreign, ...
            raise ValueError(f"{path} is corrupt: it cannot be read") from None
        check(isinstance(part, dict), f"{path} is not a state dict")
        weights |= part
    ours = {}
    for name, weight in weights.items():
        if not name.endswith("rotary_emb.inv_freq"):
            ours[name] = weight
    if model.config.tie_embeddings and "model.embed_tokens.weight" in ours:
        ours["lm_head.weight"] = ours["model.embed_tokens.weight"]  # tied
    # load_state_dict copies, converting to the model's float32.
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:
        raise ValueError(f"{folder}'s weights do not fit its config.json: {e}") from None
    return model


def pretrained_tokenizer(folder):
    """The tokenizer of a Hugging Face folder, checked against its model; None if it has
    none (tokenizer.json, or vocab.json and merges.txt)."""
    names = ("tokenizer.json", "vocab.json")
    if not any((Path(folder) / name).is_file() for name in names):
        return None
    tok = bpe.Tokenizer.from_pretrained(folder)
    vocab_size = config_from_pretrained(folder).vocab_size
    check(tok.vocab_size <= vocab_size,
          f"{folder}'s tokenizer has {tok.vocab_size} tokens, its model {vocab_size}: "
          "the tokenizer and the weights do not belong together")
    return tok


def fine_tuning_config(folder, out_dir, dropout):
    """`train --init-from`'s config, the folder's (with our dropout); saves its tokenizer
    as the run's."""
    config = config_from_pretrained(folder)
    tok = pretrained_tokenizer(folder)
    # The corpus becomes bpe.py's token arrays: 2 bytes a token, <|endoftext|> between texts.
    byte_level = type(tok) is bpe.Tokenizer and bpe.EOT in tok.special_tokens
    check(byte_level and tok.vocab_size <= bpe.MAX_VOCAB_SIZE,
          f"train --init-from needs a byte-level BPE with {bpe.EOT}, as bpe.py's: "
          f"{folder}'s tokenizer is not one")
    tok_path = Path(out_dir) / "tokenizer.json"
    ours = not tok_path.exists() or bpe.Tokenizer.load(tok_path).fingerprint == tok.fingerprint
    check(ours,
          f"{tok_path} is another tokenizer than {folder}'s: fine-tune into another --out-dir")
    # Under torchrun the others wait for process 0.
    if not tok_path.exists() and RANK == 0:
        tok.save(tok_path)
    return replace(config, dropout=dropout)


def export(model, tok, folder):
    """Write model and tokenizer as a Hugging Face folder, --init-from's inverse:
    config.json, model.safetensors (the same names), tokenizer.json."""
    folder = Path(folder)
    config = model.config
    hf_config = {theirs: getattr(config, ours) for theirs, ours in CONFIG_KEYS.items()}
    hf_config.update({key: computed[0] for key, computed in SUPPORTED.items()})
    hf_config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if config.rope_scaling:
        hf_config["rope_scaling"] = {"rope_type": "llama3", **config.rope_scaling}
    weights = {name: weight.contiguous() for name, weight in model.state_dict().items()}
    if config.tie_embeddings:
        del weights["lm_head.weight"]  # stored once, as embed_tokens
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tok.save_pretrained(folder)
    print(f"wrote {folder}:", *sorted(path.name for path in folder.iterdir()))


def cmd_export(args):
    """`export`: the run in --out-dir as a Hugging Face folder."""
    to = Path(args.to or Path(args.out_dir) / "hf")
    check(not (to / "ckpt.pt").exists(),
          f"--to {to} holds a run, whose tokenizer.json export would replace: give another")
    model, tok = load_trained(args.out_dir, torch.device("cpu"))
    export(model, tok, to)


# -----------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse, reporting a bad flag like any bad input: one line, exit 1."""

    def error(self, message):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def add_fields(parser, config_class, *names):
    """A flag for each field of config_class (or the named ones): --n-layer, n_layer."""
    for f in fields(config_class):
        if names and f.name not in names:
            continue
        kind = f.type
        if not isinstance(kind, type):
            kind = kind.__args__[0]  # int | None converts with int
        kind = f.metadata.get("type", kind)
        default = f.default
        if callable(f.default_factory):
            default = f.default_factory()
        options = dict(type=kind, default=default)
        if kind is bool:
            options = dict(action="store_true")
        parser.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"], **options)


def cmd_train(args):
    config = Qwen3Config(**{f.name: getattr(args, f.name) for f in fields(Qwen3Config)})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    # The pretrained model's shape replaces the flags'.
    if cfg.init_from:
        config = fine_tuning_config(cfg.init_from, cfg.out_dir, config.dropout)
    train(config, cfg)


def cmd_eval(args):
    """`eval`: loss and bits per character on a validation split or a file."""
    check(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}")
    device = pick_device(args.device)
    model, tok = load_trained(args.out_dir, device, args.init_from)
    check(tok, f"{args.init_from} has no tokenizer: tokenizer.json, or vocab.json")
    check(args.data or args.text or not args.init_from,
          "eval --init-from scores --data DIR or --text FILE")
    if args.text:
        what = args.text
        # The end-of-text token first, as in the .bin files.
        tokens = torch.tensor(tok.encode_prompt(bpe.read_text(args.text)))
    elif args.data:  # with this tokenizer
        what = f"validation split of {args.data}"
        docs = bpe.split_corpus(bpe.read_corpus(args.data))[1]
        tokens = torch.tensor([id for _, text in docs for id in tok.encode_prompt(text)])
    else:  # the run's own, as train encoded it
        what = f"validation split of {args.out_dir}"
        tokens = load_tokens(Path(args.out_dir) / "val.bin")
    check(len(tokens) > 1, f"{what} has no token to predict")
    batches = sequential_batches(tokens, args.batch_size, model.config.block_size)
    char_counts = torch.tensor(tok.char_counts(), device=device)
    loss, bpc = evaluate(model, batches, char_counts, device)
    print(f"{what}: loss {loss:.4f} per token, {bpc:.4f} bits per character "
          f"({len(tokens) - 1:,} tokens)")


def build_parser():
    parser = ArgumentParser(prog=f"{MODEL}.py", description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help, run, *run_fields):
        # No abbreviations: a typo is an error, not another flag (--max-iter).
        sub = commands.add_parser(name, help=help, allow_abbrev=False,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(run=run)
        add_fields(sub, TrainConfig, *run_fields)
        return sub

    add_fields(command("train", "train a model", cmd_train), Qwen3Config)
    sample = command("sample", "generate text", cmd_sample, "out_dir", "init_from", "seed",
                     "device")
    sample.add_argument("--prompt", help="the text to continue (None: a blank page)")
    sample.add_argument("--prompt-file", help="the prompt, from this UTF-8 file")
    sample.add_argument("--prompt-ids", type=int, nargs="+",
                        help="the prompt as token ids (no tokenizer: ids out too)")
    sample.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate")
    sample.add_argument("--temperature", type=float, default=0.8,
                        help="0: greedy; higher: more random")
    sample.add_argument("--top-k", type=int, help="sample from the k likeliest tokens only")
    sample.add_argument("--top-p", type=float,
                        help="sample from the likeliest tokens holding this probability")
    sample.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                        help="generate with the KV-cache")
    eval_args = command("eval", "loss and bits per character", cmd_eval, "out_dir", "init_from",
                        "batch_size", "device")
    eval_args.add_argument("--data",
                           help="score this corpus's validation split (None: the run's own)")
    eval_args.add_argument("--text", help="score this UTF-8 file instead")
    export_args = command("export", "write a run as a Hugging Face Qwen3 folder", cmd_export,
                          "out_dir")
    export_args.add_argument("--to", metavar="DIR",
                             help="the folder to write (None: hf in --out-dir)")
    return parser


def dialogue_prompt(argv):
    """argv with `--prompt -Да` as `--prompt=-Да`: argparse reads a line of dialogue,
    which starts with a dash, as a flag."""
    argv = list(argv)
    for i, value in enumerate(argv[1:]):
        one_dash = value.startswith("-") and not value.startswith("--")
        if argv[i] == "--prompt" and one_dash and value != "-h":
            argv[i : i + 2] = [f"--prompt={value}"]
            break
    return argv


def main(argv=None):
    """Run a command; a user's mistake ends as one line on stderr and exit code 1."""
    args = build_parser().parse_args(dialogue_prompt(sys.argv[1:] if argv is None else argv))
    # UTF-8 whatever the console's code page.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace")
    try:
        args.run(args)
    except BrokenPipeError:
        # `| head` closed the pipe: end quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        # The CPU's is a plain RuntimeError, CUDA's and MPS's a subclass.
        oom = isinstance(e, (torch.OutOfMemoryError, MemoryError))
        if not oom and "can't allocate memory" not in str(e):
            raise
        print("error: out of memory: try a smaller --batch-size, --block-size or model",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
