"""
GPT-2 from scratch: the model, its data, training, sampling and command line in one file.

GPT-2 (Radford, Wu, Child, Luan, Amodei and Sutskever, 2019, "Language Models are
Unsupervised Multitask Learners") is a decoder-only Transformer trained to predict
the next token of text. It keeps GPT-1's design (Radford et al., 2018, gpt1.py): a
token embedding plus a learned position embedding, a stack of blocks of masked
multi-head self-attention and a feed-forward network, and an output head tied to
the token embedding. What changes from gpt1.py:

  - Pre-LN. Each sub-block normalises its input and adds its output to an untouched
    residual stream, x + Attn(LN(x)), where GPT-1 normalised the sum,
    LN(x + Attn(x)). A final LayerNorm (ln_f) comes before the head. Gradients then
    reach every layer through the bare residual path, so deeper stacks train stably.
  - Initialisation. The projections that write into the residual stream start
    1/sqrt(2 * n_layer) smaller, so the stream's variance does not grow with depth.
  - Scale. Byte-level BPE (any text, no unknown token), a 1024-token context, more
    and wider layers. Here: our own BPE (bpe.py) and a model sized for a CPU.
  - GELU instead of ReLU in the feed-forward network, in the tanh approximation,
    written out below. (gpt1.py keeps the classic Transformer's ReLU; the GPT-1
    paper itself already used GELU.)

Beyond the paper, generation keeps a KV-cache: the keys and values of the tokens
seen so far, so that each new token costs one position's work, not the context's.
Past the context length (block_size) the cache is re-filled from the cropped window
on every step, because learned absolute positions get renumbered when the window
slides: see GPT.stream. That keeps cached generation exactly equal to the plain one.
A cached step multiplies a single vector by every weight matrix, so it goes as fast
as the weights stream in from memory; on a CPU, generation first stores the widening
matrices transposed, the layout that streams fastest (GPT.lay_out_for_decoding), and
each large product is dealt out to all the CPU's threads (Linear).

    python gpt2.py train                   # tokenizer, encoded corpus, then training
    python gpt2.py sample --prompt "Мой дядя"

Ctrl-C during training saves a checkpoint, and `python gpt2.py train --resume`
continues it. `python gpt2.py eval` scores a checkpoint; `--help` on each command
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

MODEL = "gpt2"  # stored in every checkpoint; checkpoints of other models are refused

# -----------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    """The shape of the network. GPT-2 small is (50257, 1024, 12, 12, 768, 0.1)."""

    vocab_size: int = 3000  # tokens in the vocabulary (training takes it from the tokenizer)
    block_size: int = 256  # context length: the most tokens the model sees at once
    n_layer: int = 6  # Transformer blocks
    n_head: int = 8  # attention heads per block
    n_embd: int = 256  # width of the residual stream; each head gets n_embd // n_head
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    norm_eps: float = 1e-5  # added to the variance in LayerNorm, against division by ~0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
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
    init_from: str | None = None  # fine-tune the GPT-2 of this Hugging Face folder (None: from scratch)

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

# Normalisation is torch's nn.LayerNorm, GPT-2's: over each position's n_embd
# features, subtract the mean, divide by the standard deviation (plus norm_eps,
# GPT-2's 1e-5), then scale and shift by learned weight and bias.

# The fused kernels below compute exactly what the written-out gelu() and
# attention() compute, only faster and in less memory. The tests switch this off
# to check that claim.
FUSED = True


def gelu(x):
    """GELU (Hendrycks and Gimpel, 2016), x * Phi(x) with Phi the standard normal
    CDF, in the tanh approximation GPT-2 used: a smooth ReLU that lets a little
    negative signal through."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


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
    att = F.dropout(att, dropout_p)  # GPT-2's attention dropout: on the weights
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
    """The keys and values that every layer computed for the tokens so far.

    The buffers are allocated once, for the full context, and written in place:
    a generation step allocates and copies nothing but its own token's keys and
    values. `pos` counts the tokens held; the next tokens go to positions pos, ...
    """

    def __init__(self, config, batch_size, device, dtype):
        head_size = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # one per layer
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0

    def update(self, layer, k, v):
        """Store one layer's keys and values of the new tokens (B, n_head, T,
        head_size); return all its keys and values so far (B, n_head, pos + T,
        head_size). GPT.forward advances pos once every layer has stored."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Linear(nn.Linear):
    """A linear layer, y = x W^T + b, as nn.Linear, with a faster road for the product
    that decides how fast generation runs on a CPU: one input vector (a cached step
    at batch 1) times a large weight matrix."""

    split_from = 2**17  # weights (512 KB of float32): below, waking the other threads costs what they save

    def forward(self, x):
        if self.weight.numel() >= self.split_from and x.numel() == self.in_features and x.is_cpu:  # one vector
            return self.vector_forward(x)
        return F.linear(x, self.weight, self.bias)

    def vector_forward(self, x):
        """x (..., in_features), one vector, times W^T, on all CPU threads.

        One thread multiplies a vector by a matrix slower than the memory can feed it
        (benchmarks/generate_vs_hf.py times it), so the rows of the weight, as it lies
        in memory, are dealt out in one contiguous block per thread, and a batched
        matmul multiplies x by every block at once, each block on its own thread.
        Stored as nn.Linear keeps it, W (out, in), a block of rows is some of the
        outputs. Laid out for decoding (GPT.lay_out_for_decoding), W^T (in, out), a
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
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention: each position takes a weighted mix of the
    values of itself and the positions before it, weighted by how well its query
    matches their keys, in n_head independent heads whose outputs are concatenated
    and projected back into the residual stream."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer = layer  # which layer of a KVCache is ours
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)  # merged heads -> residual stream
        self.c_proj.residual_projection = True  # GPT-2's scaled init: see GPT._init_weights

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch, tokens, n_embd
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, n_head, head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, n_head, T, head_size)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, n_head, T_k, head_size): cached + new
        dropout_p = self.dropout if self.training else 0.0
        y = (fused_attention if FUSED else attention)(q, k, v, dropout_p)  # (B, n_head, T, head_size)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """The position-wise feed-forward network: widen to 4 * n_embd, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # GPT-2's scaled init: see GPT._init_weights
        self.dropout = config.dropout

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4 * n_embd)
        x = F.gelu(x, approximate="tanh") if FUSED else gelu(x)
        return F.dropout(self.c_proj(x), self.dropout, self.training)  # (B, T, n_embd)


class Block(nn.Module):
    """One Transformer layer, Pre-LN: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)  # (B, T, n_embd)
        return x + self.mlp(self.ln_2(x))  # (B, T, n_embd)


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


class GPT(nn.Module):
    """The language model: embeddings, n_layer blocks, a final LayerNorm and a head
    that turns each position's vector into logits over the next token."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned absolute positions
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (as in GPT-1 and GPT-2): reading a token in and predicting it
        # out share one matrix, which saves parameters and trains both from every token.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases. The projections
        that add into the residual stream (two per block) get std / sqrt(2 * n_layer):
        the stream is a sum of 2 * n_layer such outputs, and this keeps its variance
        at initialisation independent of depth."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters to train; the tied head and token embedding count once."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, folder):
        """GPT-2 from a Hugging Face model folder: OpenAI's released weights, or
        what `python gpt2.py export` wrote. See "Pretrained weights" below."""
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
        pos_emb = self.transformer.wpe.weight[start : start + T]  # (T, n_embd): positions start, ..., start + T - 1
        x = self.transformer.wte(idx) + pos_emb  # (B, T, n_embd)
        x = F.dropout(x, self.config.dropout, self.training)
        for block in self.transformer.h:
            x = block(x, kv_cache)  # (B, T, n_embd)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.inference_mode(False)  # stream() calls this in inference mode; the weights must stay trainable
    def lay_out_for_decoding(self):
        """Store each widening weight matrix (out_features > in_features: c_attn,
        c_fc and the tied head) transposed in memory, its longer side contiguous.

        A step with the KV-cache multiplies one vector by every weight matrix: it
        reads each weight once and does a single multiply-add with it, so the step
        runs at the speed the CPU's matrix-vector kernel streams the matrices in,
        and that kernel streams long contiguous rows fastest (benchmarks/
        generate_vs_hf.py times each matrix in both layouts). Only the order in
        memory changes: each weight keeps its shape and values, and every line that
        uses it computes what it did."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.out_features > module.in_features:
                # .data: new storage for the same Parameter, so the head stays tied to the embedding
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

        Past block_size the window slides by one token per step, and nothing cached
        stays valid: the position embeddings are absolute and learned, so every
        token in the window gets a new position number, and from the second layer
        on, each token's keys and values depend on what it attended to, including
        the token that just left the window. Re-filling the cache from the cropped
        window on each such step costs as much as not caching, but it computes
        exactly the model's answer; a cheaper sliding cache would silently compute
        a different model.
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
        raise FileNotFoundError(f"no checkpoint at {path}: train one first with `python gpt2.py train`")
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by gpt2.py")
    if checkpoint["model"] != MODEL:
        raise ValueError(f"{path} is a checkpoint of {checkpoint['model']!r}, not of {MODEL!r}")
    missing = {"config", "tokenizer", "step", "weights", "optimizer", "rng"} - checkpoint.keys()
    if missing:
        raise ValueError(f"{path} is corrupt: it lacks {', '.join(sorted(missing))}")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    """Build the GPT a checkpoint describes and load its weights. Names that
    torch.compile (_orig_mod.) or DistributedDataParallel (module.) prefixed are
    accepted too."""
    weights = {re.sub(r"^(_orig_mod\.|module\.)+", "", name): w for name, w in checkpoint["weights"].items()}
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
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
        self.tok, self.train_tokens, self.val_tokens = prepare_data(cfg, config.vocab_size, rank, self.log)
        self.config = replace(config, vocab_size=self.tok.vocab_size)  # a tiny text may stop BPE early
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(tokens) <= self.config.block_size:
                raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = "
                                 f"{self.config.block_size + 1}: use more text or a smaller --block-size")

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.model = GPT(self.config).to(device)
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
        # GPT, whose state_dict has no _orig_mod. or module. prefixes.
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
    """Train a GPT of shape `config` on cfg.data_dir, writing to cfg.out_dir; return
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


def cmd_sample(args):
    """`python gpt2.py sample`: stream generated text to stdout, the speed to stderr."""
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    device = pick_device(args.device)
    model, tok = load_pretrained(args.init_from, device) if args.init_from else load_trained(args.out_dir, device)
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
            if id == tok.eot_id and not args.ignore_eot:
                return
            yield id

    for i in range(args.num_samples):
        sys.stdout.write(("\n---------------\n" if i else "") + prompt)
        for text in tok.decode_stream(new_ids()):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    seconds = time.time() - start
    print(f"{n_tokens} tokens in {seconds:.2f}s: {n_tokens / seconds:.1f} tokens/s", file=sys.stderr)


# -----------------------------------------------------------------------------
# Pretrained weights: OpenAI's GPT-2 in, ours out
#
# OpenAI released GPT-2's weights; Hugging Face publishes them as the folder most
# people have on disk: config.json (the shape), model.safetensors or the older
# pytorch_model.bin (the weights), and vocab.json + merges.txt (the tokenizer,
# which bpe.Tokenizer.from_pretrained reads). Our module names are that
# checkpoint's, so loading is renaming plus one transpose per projection: OpenAI
# wrote its linear layers as "Conv1D", storing the weight as (in, out) for
# y = x @ W + b, where nn.Linear stores (out, in) for y = x @ W.T + b.
# `python gpt2.py export` writes a trained model back in the same format.

CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

# Settings of config.json with which a GPT-2 variant computes something other
# than our model: the values our model computes, and transformers' default.
SUPPORTED = {
    "activation_function": (("gelu_new", "gelu_pytorch_tanh"), "gelu_new"),  # GELU's tanh approximation
    "scale_attn_weights": ((True,), True),  # q k^T / sqrt(head_size)
    "scale_attn_by_inverse_layer_idx": ((False,), False),  # ... and / (layer + 1)
    "reorder_and_upcast_attn": ((False,), False),
    "add_cross_attention": ((False,), False),  # an encoder-decoder's extra attention
    "tie_word_embeddings": ((True,), True),  # the head is the token embedding
}

# The dtypes that GPT-2 checkpoints come in (BOOL: causal-mask buffers, skipped).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "BOOL": torch.bool}


def config_from_pretrained(folder):
    """The GPTConfig that a Hugging Face GPT-2 config.json describes; any other
    model, or a GPT-2 variant that our model does not compute, is refused."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is not a model config: it holds no JSON object")
    architectures = hf.get("architectures") or ["GPT2LMHeadModel"]
    if hf.get("model_type") != "gpt2" or not set(architectures) <= {"GPT2LMHeadModel", "GPT2Model"}:
        raise ValueError(f"{path} describes a {hf.get('model_type')} model ({', '.join(architectures)}): "
                         f"gpt2.py loads model_type gpt2 only")
    for key, (computed, default) in SUPPORTED.items():
        if hf.get(key, default) not in computed:
            raise ValueError(f"{path} sets {key} to {hf[key]!r}, a GPT-2 variant that gpt2.py does not compute")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise ValueError(f"{path} sets n_inner to {hf['n_inner']}: gpt2.py's MLP is 4 * n_embd wide")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    except KeyError as e:
        raise ValueError(f"{path} lacks {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


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
                         f"gpt2.py reads F32, F16 and BF16")
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


def write_safetensors(path, tensors):
    """Write {name: tensor} in float32, as read_safetensors reads them."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    header_bytes = json.dumps(header).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # as the format's own writer: the data 8-byte aligned
    data = bytearray(len(header_bytes).to_bytes(8, "little") + header_bytes) + bytearray(offset)
    raw = torch.frombuffer(data, dtype=torch.uint8, offset=8 + len(header_bytes))  # a view: writes land in data
    for name, t in tensors.items():
        start, end = header[name]["data_offsets"]
        raw[start:end] = t.view(-1).view(torch.uint8)
    bpe.write_atomically(path, data)


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
    """Copy the weights of a Hugging Face GPT-2 folder into `model`, a GPT of the
    shape its config.json gives: names with or without the "transformer." prefix,
    Conv1D weights transposed, the causal-mask buffers (attn.bias, attn.masked_bias)
    and a stored copy of the tied head (lm_head.weight) left out."""
    ours = {}
    for name, weight in read_pretrained_weights(folder).items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        ours["transformer." + name] = weight.t() if name.endswith(CONV1D_WEIGHTS) else weight
    expected = {name: w.shape for name, w in model.state_dict().items() if name != "lm_head.weight"}
    missing, unexpected = expected.keys() - ours.keys(), ours.keys() - expected.keys()
    if missing or unexpected:
        problems = [f"lacks {', '.join(sorted(missing))}"] * bool(missing)
        problems += [f"has weights gpt2.py does not know ({', '.join(sorted(unexpected))})"] * bool(unexpected)
        raise ValueError(f"{folder}'s weights do not fit GPT-2: it {' and '.join(problems)}")
    for name, shape in expected.items():
        if ours[name].shape != shape:
            raise ValueError(f"{folder}'s {name} has shape {tuple(ours[name].shape)}, but config.json makes it "
                             f"{tuple(shape)}: the weights and config.json do not belong together")
    ours["lm_head.weight"] = ours["transformer.wte.weight"]  # tied
    model.load_state_dict(ours)  # copies, converting F16 / BF16 to the model's float32


def pretrained_tokenizer(folder, config):
    """The tokenizer of a Hugging Face GPT-2 folder, checked against its model."""
    tok = bpe.Tokenizer.from_pretrained(folder)
    if tok.vocab_size != config.vocab_size:
        raise ValueError(f"{folder}'s vocab.json has {tok.vocab_size} tokens, but its model {config.vocab_size}: "
                         f"the tokenizer and the weights do not belong together")
    if bpe.EOT not in tok.special_tokens:
        raise ValueError(f"{folder}'s vocab.json has no {bpe.EOT} token, which gpt2.py starts and ends texts with")
    return tok


def load_pretrained(folder, device):
    """The model and tokenizer of a Hugging Face GPT-2 folder, as load_trained
    gives those of a run: for `sample --init-from` and `eval --init-from`."""
    folder = Path(folder)
    tok = pretrained_tokenizer(folder, config_from_pretrained(folder))  # fail before the slow part
    return GPT.from_pretrained(folder).to(device), tok


def fine_tuning_config(folder, out_dir, dropout):
    """For `train --init-from`: the folder's model shape (with our dropout) and its
    tokenizer, saved in out_dir as tokenizer.json, as a run's own would be, so that
    the corpus is encoded with it and checkpoints record it."""
    folder, tok_path = Path(folder), Path(out_dir) / "tokenizer.json"
    config = replace(config_from_pretrained(folder), dropout=dropout)
    tok = pretrained_tokenizer(folder, config)
    if tok_path.exists():
        if bpe.Tokenizer.load(tok_path).fingerprint != tok.fingerprint:
            raise ValueError(f"{tok_path} is another tokenizer than {folder}'s: fine-tune into another --out-dir")
    elif int(os.environ.get("RANK", 0)) == 0:  # under torchrun the others wait in prepare_data
        tok.save(tok_path)
    return config


def validation_tokens(tok, data_dir):
    """The validation novels encoded with `tok`, <|endoftext|> before each, as
    bpe.prepare_corpus would write them: for `eval --init-from`, whose tokenizer
    is not the one of the .bin files in --out-dir."""
    _, val_docs = bpe.split_corpus(bpe.read_corpus(data_dir))
    return torch.tensor([id for _, text in val_docs for id in [tok.eot_id, *tok.encode(text)]])


def export(model, tok, folder):
    """Write model and tokenizer as a Hugging Face GPT-2 folder: config.json,
    model.safetensors (Conv1D weights transposed back; the tied head stored once,
    as the token embedding, which is how transformers saves it) and vocab.json +
    merges.txt."""
    folder = Path(folder)
    config = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_layer": config.n_layer,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "bos_token_id": tok.eot_id,
        "eos_token_id": tok.eot_id,
        "tie_word_embeddings": True,
    }
    weights = {name: w.t() if name.endswith(CONV1D_WEIGHTS) else w
               for name, w in model.state_dict().items() if name != "lm_head.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    bpe.write_atomically(folder / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode("utf-8"))
    write_safetensors(folder / "model.safetensors", weights)
    tok.save_pretrained(folder)


def cmd_export(args):
    """`python gpt2.py export`: the run in --out-dir as a Hugging Face GPT-2 folder."""
    model, tok = load_trained(args.out_dir, torch.device("cpu"))
    folder = Path(args.to or Path(args.out_dir) / "hf")
    export(model, tok, folder)
    print(f"wrote {folder}: config.json, model.safetensors, vocab.json, merges.txt")


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
    """`python gpt2.py train`: the flags become a GPTConfig and a TrainConfig."""
    config = GPTConfig(**{f.name: getattr(args, f.name) for f in fields(GPTConfig)})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if cfg.init_from:  # the pretrained model's shape and tokenizer replace the flags'
        config = fine_tuning_config(cfg.init_from, cfg.out_dir, config.dropout)
    train(config, cfg)


def cmd_eval(args):
    """`python gpt2.py eval`: loss and bits per character of a checkpoint, on the
    validation novels or on a text file, every token once."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = pick_device(args.device)
    model, tok = load_pretrained(args.init_from, device) if args.init_from else load_trained(args.out_dir, device)
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
    parser = ArgumentParser(prog="gpt2.py", description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)
    model, run = GPTConfig(), TrainConfig()

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
    train_args.add_argument("--norm-eps", type=float, default=model.norm_eps, help="LayerNorm's epsilon")
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
    train_args.add_argument("--init-from", metavar="DIR",
                            help="fine-tune the GPT-2 in this Hugging Face folder: its weights, shape and "
                                 "tokenizer replace the flags' (default: none, train from scratch)")
    train_args.set_defaults(run=cmd_train)

    sample_args = commands.add_parser("sample", help="generate text", formatter_class=HelpFormatter)
    sample_args.add_argument("--out-dir", default=run.out_dir, help="where ckpt.pt and tokenizer.json are")
    sample_args.add_argument("--init-from", metavar="DIR",
                             help="sample from the GPT-2 in this Hugging Face folder instead (default: none)")
    prompt = sample_args.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the start of the text to write (default: none, a blank page)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (default: none)")
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
    sample_args.set_defaults(run=cmd_sample)

    eval_args = commands.add_parser("eval", help="loss and bits per character of a checkpoint",
                                    formatter_class=HelpFormatter)
    eval_args.add_argument("--data", default=run.data_dir, help="corpus whose validation split to score")
    eval_args.add_argument("--out-dir", default=run.out_dir, help="where ckpt.pt and tokenizer.json are")
    eval_args.add_argument("--init-from", metavar="DIR",
                           help="score the GPT-2 in this Hugging Face folder instead (default: none)")
    eval_args.add_argument("--text", help="score this UTF-8 text file (default: the validation split)")
    eval_args.add_argument("--batch-size", type=int, default=run.batch_size, help="windows per forward pass")
    eval_args.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    eval_args.set_defaults(run=cmd_eval)

    export_args = commands.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 folder",
                                      formatter_class=HelpFormatter)
    export_args.add_argument("--out-dir", default=run.out_dir, help="where ckpt.pt and tokenizer.json are")
    export_args.add_argument("--to", metavar="DIR", help="the folder to write (default: hf inside --out-dir)")
    export_args.set_defaults(run=cmd_export)
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
