"""
LLaMA from scratch: the model, its data, training, sampling and command line in one file.

LLaMA (Touvron, Lavril, Izacard et al., 2023, "LLaMA: Open and Efficient Foundation
Language Models") is a decoder-only Transformer like GPT-2 (gpt2.py), trained to
predict the next token of text. It keeps GPT-2's Pre-norm residual stack and
swaps the parts inside it for ones that later work found better or cheaper:

  - RMSNorm (Zhang and Sennrich, 2019) instead of LayerNorm: only divide by the
    root mean square of the features, then scale. No mean subtraction, no bias.
  - Rotary position embeddings (RoPE; Su et al., 2021) instead of a learned
    position embedding: each query and key is rotated by an angle proportional
    to its position, so that their dot product depends on the positions only
    through their difference.
  - SwiGLU (Shazeer, 2020) instead of GELU in the feed-forward network: a gated
    unit, down(silu(gate(x)) * up(x)), with the hidden width cut to 8/3 * n_embd
    so that its three matrices cost what GPT-2's two did.
  - No biases anywhere, and an output head not tied to the token embedding.
  - Grouped-query attention (Ainslie et al., 2023; LLaMA 2's larger models and
    LLaMA 3): n_kv_head key/value heads, each shared by n_head / n_kv_head query
    heads, which shrinks the KV-cache by that factor.

Generation keeps a KV-cache as gpt2.py's does, exact past the context length too
(see Llama.stream). The weights are named as in Hugging Face's LLaMA checkpoints, so
`--init-from DIR` (Llama.from_pretrained) loads such a folder by a plain copy. Their
tokenizers (SentencePiece, tiktoken) are not read here: such a model takes and gives
token ids, `python llama.py sample --init-from DIR --prompt-ids 1 450 4996`.

    python llama.py train                  # tokenizer, encoded corpus, then training
    python llama.py sample --prompt "Мой дядя"

Ctrl-C during training saves a checkpoint, and `python llama.py train --resume`
continues it. `python llama.py eval` scores a checkpoint; `--help` on each command
lists every flag with its default.
"""

import argparse
import csv
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import bpe

MODEL = "llama"  # stored in every checkpoint; checkpoints of other models are refused

# -----------------------------------------------------------------------------
# Config


@dataclass
class LlamaConfig:
    """The shape of the network. LLaMA-7B is (32000, 2048, 32, 32, 4096, 0.0, 32,
    1e4, 1e-6, 256, 11008, False); LLaMA 3 8B has n_kv_head 8 and rope_theta 5e5."""

    vocab_size: int = 3000  # tokens in the vocabulary (training takes it from the tokenizer)
    block_size: int = 256  # context length: the most tokens the model sees at once
    n_layer: int = 6  # Transformer blocks
    n_head: int = 8  # query heads per block
    n_embd: int = 256  # width of the residual stream; each head gets n_embd // n_head
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    n_kv_head: int = 4  # key/value heads, each shared by n_head // n_kv_head query heads
    rope_theta: float = 10000.0  # RoPE's base: the slowest pair turns by position / rope_theta
    norm_eps: float = 1e-5  # added to the mean square in RMSNorm, against division by 0
    multiple_of: int = 64  # the MLP's hidden width is rounded up to a multiple of this
    mlp_hidden: int | None = None  # the MLP's hidden width (None: 8/3 * n_embd, rounded up)
    tie_embeddings: bool = False  # share one matrix between token embedding and head

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.mlp_hidden is None:
            # LLaMA's rule: two thirds of GPT's 4 * n_embd, as SwiGLU has 3 matrices
            # where GPT's MLP has 2, rounded up to a multiple that suits the hardware.
            self.mlp_hidden = self.multiple_of * -(-int(2 * 4 * self.n_embd / 3) // self.multiple_of)
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be a positive integer, got {self.mlp_hidden!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd // n_head ({self.n_embd // self.n_head}) must be even: "
                             f"RoPE turns the features in pairs")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta must be greater than 1, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")


@dataclass
class TrainConfig:
    """How to train: data, optimisation, schedule, bookkeeping."""

    data_dir: str = field(default_factory=bpe.default_data_dir)  # folder of .txt novels
    out_dir: str = f"checkpoints/{MODEL}"  # tokenizer.json, train/val.bin, ckpt.pt, log.csv
    batch_size: int = 32  # sequences per micro-batch (per process under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    warmup_iters: int = 200  # steps of linear warmup from lr/warmup_iters to lr
    max_iters: int = 900  # optimizer steps in the run: about 30 minutes on 2 CPU cores
    lr_decay_iters: int | None = None  # step where the cosine reaches lr/10 (None: max_iters)
    weight_decay: float = 0.1  # AdamW's decoupled weight decay, on weight matrices only
    grad_clip: float = 1.0  # clip the gradient's global norm to this (0: no clipping)
    eval_interval: int = 100  # steps between evaluations (and checkpoints)
    eval_iters: int = 10  # batches per split in each evaluation
    log_interval: int = 10  # steps between progress lines
    max_time: float | None = None  # stop cleanly (and save) after this many seconds
    seed: int = 1337  # for the initial weights, dropout and the batches
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "auto"  # matmul precision: bfloat16, float32, or auto (bfloat16 where the hardware has it)
    compile: bool = False  # torch.compile the model
    resume: bool = False  # continue from out_dir/ckpt.pt
    init_from: str | None = None  # a Hugging Face LLaMA folder whose weights and shape to start from

    def __post_init__(self):
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        for name in ("batch_size", "grad_accum", "max_iters", "lr_decay_iters", "eval_interval",
                     "eval_iters", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time must be positive, got {self.max_time}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")


# -----------------------------------------------------------------------------
# Model

# The fused kernels below compute exactly what the written-out silu() and
# attention() compute, only faster and in less memory. The tests switch this off
# to check that claim.
FUSED = True


class RMSNorm(nn.Module):
    """Root mean square normalisation (Zhang and Sennrich, 2019): divide each
    position's features by their root mean square, then scale by a learned gain.
    LayerNorm's re-centring (and its bias) turned out not to be needed, and
    without them the norm is cheaper."""

    def __init__(self, n_embd, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):
        # In float32 even under bfloat16 autocast, as Hugging Face's LLaMA does: a
        # mean of squares over hundreds of features needs float32's precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, n_embd)
        return self.weight * x32.type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE; Su et al., 2021, "RoFormer").

    The head_size features of a query or key form head_size / 2 pairs; at position
    m, pair i is rotated by the angle m * theta_i, theta_i = rope_theta^(-2i / head_size):
    fast turns for the first pairs, slow ones for the last. A rotation by m then one
    by -n is one by m - n, so the score q_m . k_n depends on the positions only
    through m - n: attention sees relative positions, and nothing is learned.

    Which features pair up is a convention. Here, as in Hugging Face's checkpoints,
    feature i pairs with feature i + head_size / 2 ("rotate half"). Meta's original
    code pairs neighbours (2i, 2i + 1), treated as complex numbers. The two are the
    same model up to a permutation of the rows of each head in the q and k
    projections (evens first, then odds), which is how Hugging Face's conversion
    script turns Meta's weights into these.
    """

    def __init__(self, config):
        super().__init__()
        head_size = config.n_embd // config.n_head
        inv_freq = config.rope_theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), inv_freq)  # (block_size, hs/2)
        angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_size): pair i is (i, i + hs/2)
        # Buffers, so that they follow the model to its device; not persistent, so
        # that they stay out of checkpoints (they are a function of the config).
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, start, T):
        """cos and sin (T, head_size) for the positions start, ..., start + T - 1."""
        return self.cos[start : start + T], self.sin[start : start + T]


def apply_rope(x, cos, sin):
    """Rotate the feature pairs (i, i + head_size/2) of x (B, heads, T, head_size)
    by the angles whose cos and sin (T, head_size) are given:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)  # each (B, heads, T, head_size / 2)
    rotated_half = torch.cat([-x2, x1], dim=-1)  # (B, heads, T, head_size)
    return x * cos + rotated_half * sin


def silu(x):
    """SiLU, or Swish with beta = 1 (Ramachandran et al., 2017): x * sigmoid(x),
    the activation inside SwiGLU."""
    return x * torch.sigmoid(x)


def attention(q, k, v, dropout_p=0.0):
    """Masked scaled dot-product attention, written out: softmax(q k^T / sqrt(d)) v.

    q (B, n_head, T, head_size) are the queries of the *last* T of the T_k
    positions whose keys and values k, v (B, n_head, T_k, head_size) hold: in
    training T == T_k, with a KV-cache the earlier positions are cached. The mask
    lets query i (at position T_k - T + i) see keys 0 .. T_k - T + i only.
    """
    T, T_k = q.size(-2), k.size(-2)
    att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, n_head, T, T_k)
    causal = torch.ones(T, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T)
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, dropout_p)  # dropout on the attention weights, as in gpt2.py
    return att @ v  # (B, n_head, T, head_size)


def fused_attention(q, k, v, dropout_p=0.0):
    """attention() through F.scaled_dot_product_attention: one kernel that never
    holds the (T, T_k) weight matrix when it can avoid it."""
    T, T_k = q.size(-2), k.size(-2)
    if T == T_k:  # training, or filling an empty cache: the plain causal mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # A single new token sees every cached key: no mask at all. Several new tokens
    # after cached ones need attention()'s mask, which is_causal cannot express.
    mask = None if T == 1 else torch.ones(T, T_k, dtype=torch.bool, device=q.device).tril(T_k - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class KVCache:
    """The keys and values that every layer computed for the tokens so far: with
    grouped-query attention only the n_kv_head shared heads, n_head / n_kv_head
    times less memory than multi-head attention needs.

    The buffers are allocated once, for the full context, and written in place:
    a generation step allocates and copies nothing but its own token's keys and
    values. `pos` counts the tokens held; the next tokens go to positions pos, ...
    """

    def __init__(self, config, batch_size, device, dtype):
        head_size = config.n_embd // config.n_head
        shape = (batch_size, config.n_kv_head, config.block_size, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # one per layer
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0

    def update(self, layer, k, v):
        """Store one layer's keys and values of the new tokens (B, n_kv_head, T,
        head_size), already rotated; return all its keys and values so far (B,
        n_kv_head, pos + T, head_size). Llama.forward advances pos once every layer has stored."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Linear(nn.Linear):
    """A linear layer without bias, y = x W^T, as nn.Linear, with a faster road for
    the product that decides how fast generation runs on a CPU: one input vector (a
    cached step at batch 1) times a large weight matrix."""

    split_from = 2**17  # weights (512 KB of float32): below, waking the other threads costs what they save

    def forward(self, x):
        if self.weight.numel() >= self.split_from and x.numel() == self.in_features and x.is_cpu:  # one vector
            return self.vector_forward(x)
        return F.linear(x, self.weight)

    def vector_forward(self, x):
        """x (..., in_features), one vector, times W^T, on all CPU threads.

        One thread multiplies a vector by a matrix slower than the memory can feed it
        (benchmarks/generate_vs_hf.py times it, for gpt2.py's matrices), so the rows of
        the weight, as it lies in memory, are dealt out in one contiguous block per
        thread, and a batched matmul multiplies x by every block at once, each block on
        its own thread.
        Stored as nn.Linear keeps it, W (out, in), a block of rows is some of the
        outputs. Laid out for decoding (Llama.lay_out_for_decoding), W^T (in, out), a
        block of rows is some of the inputs, and the partial products add up."""
        threads, weight = torch.get_num_threads(), self.weight
        if weight.is_contiguous():  # rows of W: each thread computes some of the outputs
            parts = math.gcd(threads, self.out_features)
            w_parts = weight.view(parts, -1, self.in_features).transpose(1, 2)  # (parts, in, out / parts)
            x_parts = x.reshape(1, 1, -1).expand(parts, -1, -1)  # (parts, 1, in): the whole x for each
            y = torch.bmm(x_parts, w_parts).view(1, -1)  # (1, out): the parts' outputs side by side
        else:  # rows of W^T: each thread takes some of the inputs
            parts = math.gcd(threads, self.in_features)
            w_parts = weight.t().view(parts, -1, self.out_features)  # (parts, in / parts, out)
            x_parts = x.reshape(parts, 1, -1)  # (parts, 1, in / parts)
            y = torch.bmm(x_parts, w_parts).sum(0)  # (1, out): the parts' partial products added
        return y.view(*x.shape[:-1], self.out_features)


class CausalSelfAttention(nn.Module):
    """Masked grouped-query self-attention (Ainslie et al., 2023): n_head query
    heads, but only n_kv_head key and value heads, each shared by a group of
    n_head / n_kv_head consecutive query heads. n_kv_head = n_head is GPT's
    multi-head attention, n_kv_head = 1 multi-query attention (Shazeer, 2019).
    Queries and keys are rotated by their positions (RoPE) before they meet."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.layer = layer  # which layer of a KVCache is ours
        kv_width = config.n_kv_head * self.head_size
        self.q_proj = Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = Linear(config.n_embd, kv_width, bias=False)
        self.v_proj = Linear(config.n_embd, kv_width, bias=False)
        self.o_proj = Linear(config.n_embd, config.n_embd, bias=False)  # merged heads -> residual stream
        self.o_proj.residual_projection = True  # GPT-2's scaled init: see Llama._init_weights

    def forward(self, x, rope, kv_cache=None):
        B, T, C = x.size()  # batch, tokens, n_embd
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, n_head, T, head_size)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, n_kv_head, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, n_kv_head, T, hs)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # rotated by their positions; v is not
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, n_kv_head, T_k, head_size): cached + new
        # Each key/value head serves n_head / n_kv_head consecutive query heads.
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, T_k, head_size)
        v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, T_k, head_size)
        dropout_p = self.dropout if self.training else 0.0
        y = (fused_attention if FUSED else attention)(q, k, v, dropout_p)  # (B, n_head, T, head_size)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return F.dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """The position-wise feed-forward network as a SwiGLU (Shazeer, 2020,
    "GLU Variants Improve Transformer"): down(silu(gate(x)) * up(x)). The gate
    decides, feature by feature, how much of up(x) passes."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.down_proj.residual_projection = True  # GPT-2's scaled init: see Llama._init_weights
        self.dropout = config.dropout

    def forward(self, x):
        gate = self.gate_proj(x)  # (B, T, mlp_hidden)
        gate = F.silu(gate) if FUSED else silu(gate)
        return F.dropout(self.down_proj(gate * self.up_proj(x)), self.dropout, self.training)  # (B, T, n_embd)


class Block(nn.Module):
    """One Transformer layer, Pre-norm as in GPT-2: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = CausalSelfAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache)  # (B, T, n_embd)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, n_embd)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick the next token (B, 1) from the last position's logits (B, vocab_size).

    temperature 0 is greedy; otherwise logits are divided by the temperature, then
    optionally only the top_k most likely tokens are kept, and of those only the
    smallest set whose probability adds up to top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already hold top_p: the most
        # likely token is always kept.
        dropped = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(dropped, 0.0))
    return torch.multinomial(probs, num_samples=1)


class Llama(nn.Module):
    """The language model: a token embedding, n_layer blocks, a final RMSNorm and a
    head that turns each position's vector into logits over the next token.
    Positions enter only through the rotations inside attention."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            rotary_emb=RotaryEmbedding(config),  # no weights: the rotation angles of each position
            layers=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # LLaMA keeps the head apart from the token embedding: at this size an
        # untied head costs vocab_size * n_embd parameters, at 7B a rounding error.
        # Tying (GPT-2's choice) is a flag, used by some small LLaMA-family models.
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        """GPT-2's initialisation, kept from gpt2.py: N(0, 0.02) weights; the
        projections that add into the residual stream (o_proj and down_proj) get
        std / sqrt(2 * n_layer): the stream is a sum of 2 * n_layer such outputs,
        and this keeps its variance at initialisation independent of depth.
        (Meta's code and Hugging Face's use N(0, 0.02) without that scaling.)"""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters to train; a tied head and token embedding count once."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, folder):
        """LLaMA from a Hugging Face model folder (config.json + model.safetensors
        or pytorch_model.bin), in float32. See "Pretrained weights" below."""
        model = cls(config_from_pretrained(Path(folder)))
        load_pretrained_weights(model, Path(folder))
        return model.eval()

    def forward(self, idx, targets=None, kv_cache=None):
        """Logits (B, T, vocab_size) for the token ids idx (B, T), and, given targets
        (B, T), the mean cross-entropy loss; else None. With a kv_cache, idx are the
        tokens after the cached ones, at positions kv_cache.pos, kv_cache.pos + 1, ..."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens do not fit the context of {self.config.block_size}")
        rope = self.model.rotary_emb(start, T)  # cos, sin (T, head_size): the rotations of these positions
        x = self.model.embed_tokens(idx)  # (B, T, n_embd)
        x = F.dropout(x, self.config.dropout, self.training)
        for block in self.model.layers:
            x = block(x, rope, kv_cache)  # (B, T, n_embd)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.inference_mode(False)  # stream() calls this in inference mode; the weights must stay trainable
    def lay_out_for_decoding(self):
        """Store each widening weight matrix (out_features > in_features: gate_proj,
        up_proj and the head) transposed in memory, its longer side contiguous.

        A step with the KV-cache multiplies one vector by every weight matrix: it
        reads each weight once and does a single multiply-add with it, so the step
        runs at the speed the CPU's matrix-vector kernel streams the matrices in,
        and that kernel streams long contiguous rows fastest (benchmarks/
        generate_vs_hf.py times gpt2.py's matrices in both layouts). Only the order in
        memory changes: each weight keeps its shape and values, and every line that
        uses it computes what it did."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.out_features > module.in_features:
                # .data: new storage for the same Parameter, so a tied head stays tied to the embedding
                module.weight.data = module.weight.data.t().contiguous().t()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Extend idx (B, T) by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache))
        return torch.cat([idx, *new], dim=1)

    @torch.inference_mode()  # no_grad minus autograd's version counters: a small model's step ~15% faster
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Yield max_new_tokens new tokens (B, 1), one at a time, as they are sampled.

        Without the cache every step runs the whole window: the last block_size
        tokens. With it, the first step runs the window once and fills the cache,
        and each later step runs only the newest token, which attends to the cached
        keys and values of the ones before it.

        Past block_size the window slides by one token per step. With RoPE, unlike
        gpt2.py's learned positions, a cached key need not be renumbered: scores
        depend only on relative positions. But it is still stale: from the second
        layer on, each token's keys and values depend on what it attended to,
        including the tokens that have left the window. Re-filling the cache from
        the cropped window on each such step costs as much as not caching, but it
        computes exactly the model's answer; a cheaper sliding cache would silently
        compute a different model.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must not be negative, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        B, T = idx.size()
        if T == 0:
            raise ValueError("generation needs at least one token to start from")
        block_size = self.config.block_size
        tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
        tokens[:, :T] = idx
        if use_cache and idx.device.type == "cpu":  # measured on CPUs; GPUs keep the trained layout
            self.lay_out_for_decoding()
        kv_cache = KVCache(self.config, B, idx.device, self.lm_head.weight.dtype) if use_cache else None
        for t in range(T, T + max_new_tokens):  # t: tokens so far
            if kv_cache is not None and kv_cache.pos == t - 1 and t <= block_size:
                x = tokens[:, t - 1 : t]  # (B, 1): the rest is cached
            else:
                x = tokens[:, max(0, t - block_size) : t]  # (B, <= block_size): the whole window
                if kv_cache is not None:
                    kv_cache.pos = 0  # fill (or re-fill: see above) from the window
            logits, _ = self(x, kv_cache=kv_cache)  # (B, T_x, vocab_size)
            tokens[:, t : t + 1] = sample_next(logits[:, -1, :], temperature, top_k, top_p)
            yield tokens[:, t : t + 1]


# -----------------------------------------------------------------------------
# Data


def load_tokens(path):
    """A .bin file of bpe.prepare_corpus as a 1-D uint16 tensor: 2 bytes a token,
    with no int64 copy of the whole corpus."""
    path = Path(path)
    return torch.from_file(str(path), dtype=torch.uint16, size=path.stat().st_size // 2)


def windows(tokens, starts, length):
    """The token windows tokens[s : s + length] for each s in starts: (len(starts), length),
    as int64 (only these few windows are widened, not the corpus)."""
    return tokens[starts[:, None] + torch.arange(length)].long()


def get_batch(tokens, batch_size, block_size, generator, rank=0, world_size=1):
    """A batch of random windows of block_size + 1 tokens: inputs x (B, block_size)
    and targets y (B, block_size), y being x shifted one token ahead.

    Every process draws the starts of all processes' batches from an identically
    seeded generator and keeps its own share, so that the generator's state is the
    same everywhere (one state to checkpoint) and 2 processes with batch B see the
    batch 1 process with batch 2 * B would see."""
    starts = torch.randint(len(tokens) - block_size, (world_size * batch_size,), generator=generator)
    window = windows(tokens, starts[rank * batch_size : (rank + 1) * batch_size], block_size + 1)
    return window[:, :-1], window[:, 1:]


def sequential_batches(tokens, batch_size, block_size):
    """Every token of `tokens` predicted once, in order: consecutive windows of
    block_size + 1 tokens, overlapping by one, batch_size at a time; a shorter
    window last. Yields (x, y) like get_batch."""
    n_full = (len(tokens) - 1) // block_size
    for first in range(0, n_full, batch_size):
        starts = torch.arange(first, min(first + batch_size, n_full)) * block_size
        window = windows(tokens, starts, block_size + 1)
        yield window[:, :-1], window[:, 1:]
    rest = tokens[n_full * block_size :].long()
    if len(rest) > 1:
        yield rest[None, :-1], rest[None, 1:]


# -----------------------------------------------------------------------------
# Training


def configure_optimizer(model, cfg, device):
    """AdamW; weight decay only on the weight matrices (linear and embedding
    weights, the parameters with 2 dimensions). Pulling biases and LayerNorm gains
    toward zero would only fight what they are for."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # betas (0.9, 0.95), GPT-3's: a shorter memory of the squared gradient than
    # the default 0.999 reacts sooner when the gradient's scale changes.
    fused = device.type in ("cuda", "cpu")  # one kernel per step for all parameters
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def get_lr(step, cfg):
    """Learning rate for step (0-based): linear warmup to cfg.lr, then a cosine
    down to cfg.lr / 10 at lr_decay_iters, then flat."""
    min_lr = cfg.lr / 10
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if step >= cfg.lr_decay_iters:
        return min_lr
    progress = (step - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def train_step(model, optimizer, tokens, cfg, config, batch_generator, device, autocast, rank=0, world_size=1):
    """One optimizer step over cfg.grad_accum micro-batches; returns the mean loss.
    Under DistributedDataParallel the gradients are averaged across processes on
    the last micro-batch only: the others skip that exchange (no_sync)."""
    total = 0.0
    for micro_step in range(cfg.grad_accum):
        x, y = get_batch(tokens, cfg.batch_size, config.block_size, batch_generator, rank, world_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        syncing = micro_step == cfg.grad_accum - 1 or not isinstance(model, DistributedDataParallel)
        with nullcontext() if syncing else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            (loss / cfg.grad_accum).backward()
        total += loss.detach() / cfg.grad_accum
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model, batches, char_counts, device, autocast=None):
    """Mean loss per token (nats) and bits per character over batches of (x, y).

    Bits per character = total nats / ln 2 / characters of the targets' text:
    unlike loss per token, it does not depend on the tokenizer, so models with
    any vocabulary compare on one scale. char_counts (vocab_size,) says how many
    characters each token adds. Under torchrun the totals are summed over processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, characters
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits, _ = model(x)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        totals[1] += y.numel()
        totals[2] += char_counts[y].sum()
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(totals)
    nats, n_tokens, n_chars = totals.tolist()
    return nats / n_tokens, nats / math.log(2) / n_chars if n_chars else float("nan")


def save_checkpoint(path, model, optimizer, step, tok, batch_generator):
    """Everything needed to continue exactly: weights, optimizer, step, the random
    states (dropout, batches), the config as a plain dict and the tokenizer's
    fingerprint. Written to a temporary file beside it, then renamed over it, so
    that a crash leaves the old checkpoint or the new one, never half of one."""
    checkpoint = {
        "model": MODEL,
        "config": asdict(model.config),
        "tokenizer": tok.fingerprint,
        "step": step,
        "weights": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "batches": batch_generator.get_state()},
    }
    if torch.cuda.is_available():
        checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_torch_file(path):
    """torch.load with weights_only: tensors and plain data, no code run from the
    file. Any failure to read it is one sentence."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated zip, a foreign pickle, ...: each fails in its own way
        raise ValueError(f"{path} is corrupt or not a checkpoint: it cannot be read") from None


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, checked; anything else is refused
    with one sentence that says what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first with `python llama.py train`")
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by llama.py")
    if checkpoint["model"] != MODEL:
        raise ValueError(f"{path} is a checkpoint of {checkpoint['model']!r}, not of {MODEL!r}")
    missing = {"config", "tokenizer", "step", "weights", "optimizer", "rng"} - checkpoint.keys()
    if missing:
        raise ValueError(f"{path} is corrupt: it lacks {', '.join(sorted(missing))}")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    """Build the Llama a checkpoint describes and load its weights. Names that
    torch.compile (_orig_mod.) or DistributedDataParallel (module.) prefixed are
    accepted too."""
    weights = {re.sub(r"^(_orig_mod\.|module\.)+", "", name): w for name, w in checkpoint["weights"].items()}
    try:
        model = Llama(LlamaConfig(**checkpoint["config"]))
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt: its weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model


def check_tokenizer(checkpoint, tok, path):
    """Token ids mean nothing with another tokenizer: refuse the mix."""
    if checkpoint["tokenizer"] != tok.fingerprint:
        raise ValueError(f"{path} was trained with another tokenizer than {path.parent / 'tokenizer.json'}")


def resume(checkpoint, path, model, optimizer, batch_generator):
    """Load a run's state from its checkpoint; return the step to continue from."""
    theirs, ours = checkpoint["config"], asdict(model.config)
    if theirs != ours:
        differ = ", ".join(f"{k}={theirs.get(k)} (asked: {v})" for k, v in ours.items() if theirs.get(k) != v)
        raise ValueError(f"{path} has another model shape: {differ}; give the same flags to resume")
    model.load_state_dict(model_from_checkpoint(checkpoint, path).state_dict())
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    batch_generator.set_state(checkpoint["rng"]["batches"])
    if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    return checkpoint["step"]


def pick_device(name, local_rank=0):
    """torch.device for --device: auto picks cuda, then mps, then cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps, but MPS is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def mixed_precision(device, dtype):
    """The autocast context for training: matrix products in bfloat16, while the
    weights, the optimizer and the reductions (softmax, norms, loss) stay float32.
    bfloat16 has float32's exponent range, so unlike float16 it needs no loss
    scaling. auto takes it where the hardware computes it natively: CUDA GPUs
    since Ampere, CPUs with AVX512-BF16 or AMX (1.5x float32's speed on a 2-core
    AVX512-BF16 machine); elsewhere it is emulated, slower than float32. On CUDA,
    float32 matmuls use TF32 either way: float32's range, about 8x the speed."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        native = {
            "cuda": lambda: torch.cuda.is_bf16_supported(including_emulation=False),
            "cpu": lambda: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
        }
        dtype = "bfloat16" if device.type in native and native[device.type]() else "float32"
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def prepare_data(cfg, vocab_size, rank, log):
    """bpe.prepare_corpus: the tokenizer and the encoded splits, made once and
    cached in out_dir. A tokenizer already there is kept, whatever its size: the
    model takes its vocabulary from the tokenizer. Under torchrun, process 0 makes
    them while the others wait, then the others load what it made."""
    if rank != 0:
        dist.barrier()
    if (Path(cfg.out_dir) / "tokenizer.json").exists():
        vocab_size = None
    tok, train_path, val_path = bpe.prepare_corpus(cfg.data_dir, cfg.out_dir, vocab_size, log=log)
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    return tok, load_tokens(train_path), load_tokens(val_path)


class StopRequest:
    """Ctrl-C (SIGINT) during training asks the loop to stop after the current
    step, so that the checkpoint it saves is a clean state to resume from. A
    second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)


def agree(*flags, device):
    """Stop flags as every process sees them. Under torchrun all processes must
    stop at the same step, or the others would wait forever for the gradients of
    the one that left: a flag raised in any process counts for all."""
    if not dist.is_initialized():
        return flags
    flags = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return tuple(bool(flag) for flag in flags.tolist())


class CsvLog:
    """One row per evaluation in out_dir/log.csv (appended to when resuming)."""

    COLUMNS = ["step", "lr", "train_loss", "train_bpc", "val_loss", "val_bpc", "tokens_per_s", "elapsed_s"]

    def __init__(self, path, append):
        self.path = path
        if not (append and path.exists()):
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(self.COLUMNS)

    def write(self, **row):
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.COLUMNS).writerow(row)


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Trainer:
    """One process's training run: the data, the model and its optimizer, the
    random state, and the loop that steps, logs, evaluates and checkpoints."""

    def __init__(self, config, cfg, device, rank=0, world_size=1):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        self.log = print if rank == 0 else lambda *args, **kwargs: None
        self.ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
        checkpoint = None
        if cfg.resume:  # fail before any work
            checkpoint = load_checkpoint(self.ckpt_path)
            check_tokenizer(checkpoint, bpe.Tokenizer.load(self.ckpt_path.parent / "tokenizer.json"), self.ckpt_path)
        if cfg.init_from:  # fine-tuning: the folder's shape (with our dropout) replaces the shape flags
            config = replace(config_from_pretrained(Path(cfg.init_from)), dropout=config.dropout)
            if not (Path(cfg.out_dir) / "tokenizer.json").is_file():
                raise FileNotFoundError(f"train --init-from needs the bpe.py tokenizer whose ids the model knows "
                                        f"as {Path(cfg.out_dir) / 'tokenizer.json'}: llama.py does not read "
                                        f"LLaMA's own tokenizers")
        self.tok, self.train_tokens, self.val_tokens = prepare_data(cfg, config.vocab_size, rank, self.log)
        if not cfg.init_from:
            self.config = replace(config, vocab_size=self.tok.vocab_size)  # a tiny text may stop BPE early
        elif self.tok.vocab_size > config.vocab_size:
            raise ValueError(f"{Path(cfg.out_dir) / 'tokenizer.json'} has {self.tok.vocab_size} tokens, more than "
                             f"the {config.vocab_size} of the model in {cfg.init_from}")
        else:
            self.config = config
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(tokens) <= self.config.block_size:
                raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = "
                                 f"{self.config.block_size + 1}: use more text or a smaller --block-size")

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.model = Llama(self.config).to(device)
        if cfg.init_from and checkpoint is None:  # fine-tuning: start from the released weights
            load_pretrained_weights(self.model, Path(cfg.init_from))
        self.optimizer = configure_optimizer(self.model, cfg, device)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        if checkpoint is not None:
            self.step = resume(checkpoint, self.ckpt_path, self.model, self.optimizer, self.batch_generator)
            self.log(f"resuming from {self.ckpt_path} at step {self.step}")
        elif self.ckpt_path.exists():
            self.log(f"starting a new run: {self.ckpt_path} will be overwritten (--resume continues it instead)")

        self.autocast = mixed_precision(device, cfg.dtype)
        # What the loop calls: compiled and/or wrapped. self.model stays the plain
        # Llama, whose state_dict has no _orig_mod. or module. prefixes.
        self.trained = torch.compile(self.model) if cfg.compile else self.model
        if world_size > 1:
            self.trained = DistributedDataParallel(self.trained, device_ids=[device] if device.type == "cuda" else None)
        self.char_counts = torch.tensor(self.tok.char_counts(), device=device)
        self.csv_log = CsvLog(Path(cfg.out_dir) / "log.csv", append=checkpoint is not None) if rank == 0 else None
        precision = "bfloat16 autocast" if isinstance(self.autocast, torch.autocast) else "float32"
        self.log(f"{MODEL}: {self.model.num_params() / 1e6:.2f}M parameters, {self.config}")
        self.log(f"tokens: {len(self.train_tokens):,} train, {len(self.val_tokens):,} val | {device}, {precision}, "
                 f"{world_size} process(es)")

    def run(self):
        """Step to max_iters, or until --max-time or Ctrl-C; evaluate and save every
        eval_interval steps and at the end."""
        cfg = self.cfg
        if self.step >= cfg.max_iters:
            self.log(f"{self.ckpt_path} is at step {self.step} already: give a larger --max-iters to go on")
            return
        start, first_step = time.time(), self.step
        window_start, window_steps = start, 0  # for tokens/s, evaluations left out
        tokens_per_step = cfg.batch_size * self.config.block_size * cfg.grad_accum * self.world_size
        with StopRequest() as stop:
            while self.step < cfg.max_iters:
                lr = get_lr(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = train_step(self.trained, self.optimizer, self.train_tokens, cfg, self.config,
                                  self.batch_generator, self.device, self.autocast, self.rank, self.world_size)
                self.step += 1
                window_steps += 1
                elapsed = time.time() - start
                interrupted, out_of_time = agree(stop.requested, cfg.max_time is not None and elapsed > cfg.max_time,
                                                 device=self.device)
                if interrupted:
                    self.save()
                    self.log(f"interrupted at step {self.step}: saved {self.ckpt_path}; --resume continues")
                    return
                tokens_per_s = window_steps * tokens_per_step / (time.time() - window_start)
                if self.step == first_step + 1 or self.step % cfg.log_interval == 0:
                    self.log(f"step {self.step}/{cfg.max_iters} | loss {loss.item():.4f} | lr {lr:.2e} | "
                             f"{tokens_per_s:,.0f} tok/s")
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters or out_of_time:
                    eta = (cfg.max_iters - self.step) * elapsed / (self.step - first_step)
                    if cfg.max_time is not None:
                        eta = min(eta, max(0.0, cfg.max_time - elapsed))
                    self.evaluate_and_save(lr, tokens_per_s, elapsed, eta)
                    window_start, window_steps = time.time(), 0
                if out_of_time and self.step < cfg.max_iters:
                    self.log(f"stopped by --max-time at step {self.step}; --resume continues")
                    return
        self.log(f"done: saved {self.ckpt_path}")

    def evaluate_and_save(self, lr, tokens_per_s, elapsed, eta):
        """Loss and bits per character on both splits (on the same batches each time,
        so that the numbers compare), one line of report, one CSV row, a checkpoint."""
        results = []
        for tokens in (self.train_tokens, self.val_tokens):
            generator = torch.Generator().manual_seed(self.cfg.seed + 1)
            batches = (get_batch(tokens, self.cfg.batch_size, self.config.block_size, generator, self.rank,
                                 self.world_size) for _ in range(self.cfg.eval_iters))
            results += evaluate(self.trained, batches, self.char_counts, self.device, self.autocast)
        train_loss, train_bpc, val_loss, val_bpc = results
        self.log(f"eval step {self.step}: train loss {train_loss:.4f}, {train_bpc:.3f} bpc | val loss {val_loss:.4f}, "
                 f"{val_bpc:.3f} bpc | {tokens_per_s:,.0f} tok/s | elapsed {format_duration(elapsed)} | "
                 f"ETA {format_duration(eta)}")
        if self.csv_log:
            self.csv_log.write(step=self.step, lr=lr, train_loss=train_loss, train_bpc=train_bpc, val_loss=val_loss,
                               val_bpc=val_bpc, tokens_per_s=round(tokens_per_s), elapsed_s=round(elapsed, 1))
        self.save()

    def save(self):
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, self.model, self.optimizer, self.step, self.tok, self.batch_generator)


def train(config, cfg):
    """Train a Llama of shape `config` on cfg.data_dir, writing to cfg.out_dir; return
    the model. Under torchrun, one process per device, joined by DistributedDataParallel."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        trainer = Trainer(config, cfg, device, rank, world_size)
        trainer.run()
        return trainer.model
    finally:
        if world_size > 1:
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Sampling


def load_trained(out_dir, device):
    """The model and tokenizer of a finished (or interrupted) run in out_dir."""
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    checkpoint = load_checkpoint(ckpt_path)
    tok = bpe.Tokenizer.load(out_dir / "tokenizer.json")
    check_tokenizer(checkpoint, tok, ckpt_path)
    model = model_from_checkpoint(checkpoint, ckpt_path)
    return model.to(device).eval(), tok


def load_model(args, device):
    """For sample and eval: the run in --out-dir (load_trained), or with --init-from
    a Hugging Face LLaMA and maybe a tokenizer (load_pretrained, below)."""
    if args.init_from:
        return load_pretrained(args.init_from, args.tokenizer, device)
    if args.tokenizer:
        raise ValueError("--tokenizer goes with --init-from: a run's own tokenizer is in --out-dir")
    return load_trained(args.out_dir, device)


def cmd_sample(args):
    """`python llama.py sample`: stream generated text to stdout, the speed to stderr.
    Without a tokenizer (--init-from without --tokenizer) the prompt is token ids
    and so is the output."""
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    device = pick_device(args.device)
    model, tok = load_model(args, device)
    if args.prompt_ids:
        prompt_ids = args.prompt_ids
        if not all(0 <= id < model.config.vocab_size for id in prompt_ids):
            raise ValueError(f"--prompt-ids must be between 0 and {model.config.vocab_size - 1}, the model's "
                             f"vocabulary")
        prompt = tok.decode(prompt_ids) if tok else " ".join(map(str, prompt_ids))
    elif tok is None:
        raise ValueError("this model comes without a tokenizer: give the prompt as token ids (--prompt-ids 1 2 3) "
                         "or a bpe.py tokenizer (--tokenizer FILE)")
    else:
        prompt = bpe.read_text(args.prompt_file) if args.prompt_file else args.prompt or ""
        prompt_ids = [tok.eot_id] + tok.encode(prompt)  # a document starts after <|endoftext|>, as in training
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    torch.manual_seed(args.seed)
    n_tokens, start = 0, time.time()

    def new_ids():  # the sampled ids, up to <|endoftext|> unless told otherwise
        nonlocal n_tokens
        for token in model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                  use_cache=not args.no_cache):
            n_tokens += 1
            id = token.item()  # one sync with the device per token
            if tok is not None and id == tok.eot_id and not args.ignore_eot:
                return
            yield id

    for i in range(args.num_samples):
        sys.stdout.write(("\n---------------\n" if i else "") + prompt)
        for text in tok.decode_stream(new_ids()) if tok else (f" {id}" for id in new_ids()):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    seconds = time.time() - start
    print(f"{n_tokens} tokens in {seconds:.2f}s: {n_tokens / seconds:.1f} tokens/s", file=sys.stderr)


# -----------------------------------------------------------------------------
# Pretrained weights: Hugging Face's LLaMA in
#
# Meta released LLaMA's weights; Hugging Face publishes LLaMA-family models as a
# folder: config.json (the shape), model.safetensors or the older
# pytorch_model.bin (the weights), and tokenizer files. Our module names are
# that checkpoint's and nn.Linear's (out, in) layout is theirs, so loading is a
# plain copy. The tokenizers (SentencePiece, or tiktoken-style BPE with its own
# pattern) are out of scope: an --init-from model takes and gives token ids,
# unless --tokenizer names a bpe.py tokenizer whose ids it knows.

HF_ARCHITECTURES = {"LlamaForCausalLM"}
# The dtypes that LLaMA checkpoints come in.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def config_from_pretrained(folder):
    """The LlamaConfig that a Hugging Face config.json describes. What this file
    does not implement (RoPE scaling, biases, another activation or architecture)
    is refused, rather than loaded into a model that would compute something else."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: --init-from takes a Hugging Face-format LLaMA folder")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is not a model config")
    architectures = set(hf.get("architectures") or HF_ARCHITECTURES)
    if hf.get("model_type") != "llama" or not architectures <= HF_ARCHITECTURES:
        raise ValueError(f"{path} describes a {hf.get('model_type')!r} model ({', '.join(sorted(architectures))}): "
                         f"llama.py loads LlamaForCausalLM only")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5; before, rope_theta and rope_scaling
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path} asks for RoPE scaling ({hf.get('rope_scaling') or rope}), which llama.py "
                         f"does not implement")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{path} sets {flag}, but LLaMA (and llama.py) has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path} has hidden_act {hf['hidden_act']!r}; LLaMA's SwiGLU uses silu")
    try:
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, n_embd // n_head):
            raise ValueError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
        return LlamaConfig(
            vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
            n_head=n_head, n_embd=n_embd, n_kv_head=hf.get("num_key_value_heads") or n_head,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=hf.get("rms_norm_eps", 1e-6), mlp_hidden=hf["intermediate_size"],
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ValueError(f"{path} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} describes an impossible model: {e}") from None


def read_safetensors(path):
    """The tensors of a .safetensors file: 8 bytes, the length of a JSON header
    (little-endian); the header, {name: {dtype, shape, data_offsets}}; then the
    tensors' raw little-endian bytes, at those offsets from the header's end."""
    corrupt = ValueError(f"{path} is corrupt: it is not a safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > path.stat().st_size:
            raise corrupt
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            dtypes = {entry["dtype"] for entry in header.values()}
        except (ValueError, AttributeError, KeyError, TypeError):  # not JSON, or not this JSON
            raise corrupt from None
    if not dtypes <= SAFETENSORS_DTYPES.keys():
        raise ValueError(f"{path} holds {', '.join(sorted(dtypes - SAFETENSORS_DTYPES.keys()))} tensors: "
                         f"llama.py reads F32, F16 and BF16")
    raw = torch.from_file(str(path), dtype=torch.uint8, size=path.stat().st_size)[8 + n :]
    tensors = {}
    try:
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            # clone(): a tensor of its own, aligned for its dtype wherever it lay in the file
            tensors[name] = raw[start:end].clone().view(SAFETENSORS_DTYPES[entry["dtype"]]).view(entry["shape"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise corrupt from None
    return tensors


def read_pretrained_weights(folder):
    """The tensors of model.safetensors, or else of pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    path = folder / "pytorch_model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin: no weights to load")
    weights = load_torch_file(path)
    if not isinstance(weights, dict):
        raise ValueError(f"{path} holds no state dict of weights")
    return weights


def load_pretrained_weights(model, folder):
    """Copy the weights of a Hugging Face LLaMA folder into `model`, a Llama of
    the shape its config.json gives (converting F16 / BF16 to float32)."""
    weights = read_pretrained_weights(folder)
    if model.config.tie_embeddings and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")  # a tied matrix may be stored once
    expected = {name: w.shape for name, w in model.state_dict().items()}
    missing = sorted(name for name in expected if weights.get(name) is None)
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        problems = [f"lacks {', '.join(missing)}"] * bool(missing)
        problems += [f"has weights llama.py does not know ({', '.join(unexpected)})"] * bool(unexpected)
        raise ValueError(f"{folder}'s weights do not fit LLaMA: it {' and '.join(problems)}")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ValueError(f"{folder}'s {name} has shape {tuple(weights[name].shape)}, but config.json makes "
                             f"it {tuple(shape)}: the weights and config.json do not belong together")
    model.load_state_dict(weights)


def load_pretrained(folder, tokenizer, device):
    """The model of a Hugging Face LLaMA folder and, if `tokenizer` names one, a
    bpe.py tokenizer for its ids (else None): for `sample --init-from` and
    `eval --init-from`, as load_trained gives a run's model and tokenizer."""
    model = Llama.from_pretrained(folder).to(device)
    tok = bpe.Tokenizer.load(tokenizer) if tokenizer else None
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{tokenizer} has {tok.vocab_size} tokens, more than the {model.config.vocab_size} "
                         f"of the model in {folder}")
    return model, tok


def validation_tokens(tok, data_dir):
    """The validation novels encoded with `tok`, <|endoftext|> before each, as
    bpe.prepare_corpus would write them: for `eval --init-from`, whose tokenizer
    is not the one of the .bin files in --out-dir."""
    _, val_docs = bpe.split_corpus(bpe.read_corpus(data_dir))
    return torch.tensor([id for _, text in val_docs for id in [tok.eot_id, *tok.encode(text)]])


# -----------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other bad input: one line, exit 1."""

    def error(self, message):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help says what its absence means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_duration(text):
    """'90s', '30m', '1.5h' or a bare number of seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 90s, 30m or 1h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def cmd_train(args):
    """`python llama.py train`: the flags become a LlamaConfig and a TrainConfig."""
    config = LlamaConfig(**{f.name: getattr(args, f.name) for f in fields(LlamaConfig)})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    train(config, cfg)


def cmd_eval(args):
    """`python llama.py eval`: loss and bits per character of a checkpoint, on the
    validation novels or on a text file, every token once."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.init_from and not args.tokenizer:
        raise ValueError("eval --init-from needs --tokenizer FILE: a bpe.py tokenizer.json whose ids the model knows")
    device = pick_device(args.device)
    model, tok = load_model(args, device)
    if args.text:
        source = args.text
        tokens = torch.tensor([tok.eot_id] + tok.encode(bpe.read_text(args.text)))  # as in the .bin files
    elif args.init_from:
        source, tokens = f"validation split of {args.data}", validation_tokens(tok, args.data)
    else:
        _, _, val_path = bpe.prepare_corpus(args.data, args.out_dir, log=print)
        source, tokens = f"validation split of {args.data}", load_tokens(val_path)
    char_counts = torch.tensor(tok.char_counts(), device=device)
    batches = sequential_batches(tokens, args.batch_size, model.config.block_size)
    loss, bpc = evaluate(model, batches, char_counts, device)
    print(f"{source}: loss {loss:.4f} per token, {bpc:.4f} bits per character ({len(tokens) - 1:,} tokens)")


def build_parser():
    parser = ArgumentParser(prog="llama.py", description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)
    model, run = LlamaConfig(), TrainConfig()

    train_args = commands.add_parser("train", help="train a model", formatter_class=HelpFormatter)
    train_args.add_argument("--data", dest="data_dir", default=run.data_dir,
                            help="folder of UTF-8 .txt novels (env CORPUS_DIR)")
    train_args.add_argument("--out-dir", default=run.out_dir,
                            help="tokenizer.json, train.bin, val.bin, ckpt.pt and log.csv go here")
    train_args.add_argument("--vocab-size", type=int, default=model.vocab_size,
                            help="vocabulary of the BPE tokenizer trained if out-dir has none "
                                 "(an existing tokenizer.json keeps its own)")
    train_args.add_argument("--block-size", type=int, default=model.block_size, help="context length in tokens")
    train_args.add_argument("--n-layer", type=int, default=model.n_layer, help="Transformer blocks")
    train_args.add_argument("--n-head", type=int, default=model.n_head, help="attention heads per block")
    train_args.add_argument("--n-embd", type=int, default=model.n_embd, help="embedding (residual stream) width")
    train_args.add_argument("--dropout", type=float, default=model.dropout,
                            help="dropout probability (0 suits runs shorter than an epoch)")
    train_args.add_argument("--n-kv-head", type=int, default=model.n_kv_head,
                            help="key/value heads (n-head: multi-head, 1: multi-query attention)")
    train_args.add_argument("--rope-theta", type=float, default=model.rope_theta, help="RoPE's base")
    train_args.add_argument("--norm-eps", type=float, default=model.norm_eps, help="RMSNorm's epsilon")
    train_args.add_argument("--multiple-of", type=int, default=model.multiple_of,
                            help="round the MLP's hidden width (8/3 n-embd) up to a multiple of this")
    train_args.add_argument("--mlp-hidden", type=int, default=None,
                            help="the MLP's hidden width (default: 8/3 n-embd rounded up to multiple-of)")
    train_args.add_argument("--tie-embeddings", action="store_true",
                            help="share one matrix between the token embedding and the output head")
    train_args.add_argument("--batch-size", type=int, default=run.batch_size,
                            help="sequences per micro-batch, per process")
    train_args.add_argument("--grad-accum", type=int, default=run.grad_accum, help="micro-batches per step")
    train_args.add_argument("--lr", type=float, default=run.lr, help="peak learning rate")
    train_args.add_argument("--warmup-iters", type=int, default=run.warmup_iters, help="steps of linear warmup")
    train_args.add_argument("--max-iters", type=int, default=run.max_iters, help="optimizer steps in the run")
    train_args.add_argument("--lr-decay-iters", type=int, default=None,
                            help="step where the cosine decay reaches lr/10 (default: max-iters)")
    train_args.add_argument("--weight-decay", type=float, default=run.weight_decay,
                            help="AdamW weight decay on weight matrices")
    train_args.add_argument("--grad-clip", type=float, default=run.grad_clip, help="max gradient norm (0: off)")
    train_args.add_argument("--eval-interval", type=int, default=run.eval_interval,
                            help="steps between evaluations and checkpoints")
    train_args.add_argument("--eval-iters", type=int, default=run.eval_iters, help="batches per split per evaluation")
    train_args.add_argument("--log-interval", type=int, default=run.log_interval, help="steps between progress lines")
    train_args.add_argument("--max-time", type=parse_duration, default=run.max_time,
                            help="stop cleanly after this much time, e.g. 90s, 30m, 1h (default: no limit)")
    train_args.add_argument("--seed", type=int, default=run.seed, help="random seed")
    train_args.add_argument("--device", default=run.device, help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    train_args.add_argument("--dtype", default=run.dtype, choices=["auto", "bfloat16", "float32"],
                            help="precision of the matrix products (auto: bfloat16 where the hardware has it)")
    train_args.add_argument("--compile", action="store_true", help="torch.compile the model")
    train_args.add_argument("--resume", action="store_true", help="continue the run saved in out-dir")
    train_args.add_argument("--init-from", default=None,
                            help="fine-tune the LLaMA of this Hugging Face folder (config.json + model.safetensors): "
                                 "its shape replaces the shape flags, and out-dir must hold the bpe.py "
                                 "tokenizer.json whose ids it knows (default: random initial weights)")
    train_args.set_defaults(run=cmd_train)

    sample_args = commands.add_parser("sample", help="generate text", formatter_class=HelpFormatter)
    sample_args.add_argument("--out-dir", default=run.out_dir, help="where ckpt.pt and tokenizer.json are")
    prompt = sample_args.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the start of the text to write (default: none, a blank page)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (default: none)")
    prompt.add_argument("--prompt-ids", type=int, nargs="+",
                        help="the prompt as token ids, the way to prompt an --init-from model without "
                             "--tokenizer; the output is then ids too (default: none)")
    sample_args.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    sample_args.add_argument("--temperature", type=float, default=0.8, help="0: greedy; higher: more random")
    sample_args.add_argument("--top-k", type=int, help="sample from the k likeliest tokens only (default: all)")
    sample_args.add_argument("--top-p", type=float,
                             help="sample from the likeliest tokens holding this probability (default: all)")
    sample_args.add_argument("--num-samples", type=int, default=1, help="how many samples")
    sample_args.add_argument("--seed", type=int, default=1337, help="random seed")
    sample_args.add_argument("--no-cache", action="store_true", help="generate without the KV-cache (slower)")
    sample_args.add_argument("--ignore-eot", action="store_true",
                             help="go on past <|endoftext|> instead of stopping there")
    sample_args.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    sample_args.add_argument("--init-from", default=None,
                             help="sample from this Hugging Face LLaMA folder instead of out-dir's checkpoint. "
                                  "LLaMA tokenizers (SentencePiece, tiktoken) are not read: give --prompt-ids, "
                                  "or --tokenizer if the model's ids are a bpe.py tokenizer's (default: none)")
    sample_args.add_argument("--tokenizer", default=None,
                             help="with --init-from: a bpe.py tokenizer.json for the prompt and the output "
                                  "(default: none, ids in and out)")
    sample_args.set_defaults(run=cmd_sample)

    eval_args = commands.add_parser("eval", help="loss and bits per character of a checkpoint",
                                    formatter_class=HelpFormatter)
    eval_args.add_argument("--data", default=run.data_dir, help="corpus whose validation split to score")
    eval_args.add_argument("--out-dir", default=run.out_dir, help="where ckpt.pt and tokenizer.json are")
    eval_args.add_argument("--text", help="score this UTF-8 text file (default: the validation split)")
    eval_args.add_argument("--batch-size", type=int, default=run.batch_size, help="windows per forward pass")
    eval_args.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    eval_args.add_argument("--init-from", default=None,
                           help="score this Hugging Face LLaMA folder instead of out-dir's checkpoint; needs "
                                "--tokenizer (default: none)")
    eval_args.add_argument("--tokenizer", default=None,
                           help="with --init-from: the bpe.py tokenizer.json whose ids the model knows "
                                "(default: none)")
    eval_args.set_defaults(run=cmd_eval)
    return parser


def main(argv=None):
    """Run a command; a user's mistake ends as one line on stderr and exit code 1."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
