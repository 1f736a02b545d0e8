"""What every model file must do, run over each of them: the model's math and its
KV-cache, sampling, data, training and resume, DistributedDataParallel on 2 CPU
processes, the command line end to end, bad inputs, and each file being its
sibling's code outside the model.

Adding a model file to the suite is adding its name to MODELS and its row to
TABLE. What only one model has is tested in its own test_<name>.py.
"""

import ast
import csv
import difflib
import importlib
import inspect
import io
import itertools
import math
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field, fields, replace
from itertools import count, pairwise
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import (ROOT, SENTENCES, SUBPROCESS_ENV, TINY, checkpoint, one_line_error, randomize, run_cli,
                      run_main, train_args, weights)
from hypothesis import given, settings
from hypothesis import strategies as st

import bpe


@dataclass
class Model:
    """One model file, as the shared tests see it."""

    name: str  # the file, without .py; also MODEL, stored in its checkpoints
    config_class: str
    model_class: str
    title: str  # how its docstrings name it
    cache: bool  # generates with a KV-cache (and has sample --no-cache)
    window: bool = False  # sliding-window attention: any length, and generation over the whole text, uncropped
    tiny: dict = field(default_factory=dict)  # config values the shared tiny shapes need besides theirs
    sibling: str | None = None  # the file it must equal outside the model
    sibling_only: tuple = ()  # words that mark the sibling's features this file does not have
    own_only: tuple = ()  # words that mark this file's features the sibling does not have

    @property
    def module(self):
        return importlib.import_module(self.name)

    def config(self, **kwargs):
        """A config of this model's class from shared shape values; values of fields it lacks are dropped."""
        names = {f.name for f in fields(getattr(self.module, self.config_class))}
        values = dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=16) | self.tiny | kwargs
        return getattr(self.module, self.config_class)(**{k: v for k, v in values.items() if k in names})

    def build(self, **kwargs):
        return getattr(self.module, self.model_class)(self.config(**kwargs))


MODELS = ["gpt1", "gpt2", "llama", "mistral", "mixtral", "deepseek", "gpt_oss", "gemma", "qwen3", "gemma3"]
TABLE = {
    "gpt1": Model("gpt1", "GPTConfig", "GPT", "GPT-1", cache=False, sibling="gpt2",
                  sibling_only=("init_from", "export", "cache")),  # --init-from, export, --no-cache
    "gpt2": Model("gpt2", "GPTConfig", "GPT", "GPT-2", cache=True),
    "llama": Model("llama", "LlamaConfig", "Llama", "LLaMA", cache=True, tiny=dict(n_kv_head=2, multiple_of=8),
                   sibling="gpt2",
                   own_only=("prompt_ids", "prompt-ids", "if tok", "tok and", "check(tok,")),  # and sampling without a tokenizer (tok None)
    "mistral": Model("mistral", "MistralConfig", "Mistral", "Mistral", cache=True, window=True,
                     tiny=dict(n_kv_head=2, multiple_of=8, sliding_window=5), sibling="llama"),
    "mixtral": Model("mixtral", "MixtralConfig", "Mixtral", "Mixtral", cache=True, window=True,
                     tiny=dict(n_kv_head=2, multiple_of=8, sliding_window=5, n_expert=4), sibling="mistral",
                     own_only=("balance", "expert_share", "active")),  # the log: aux loss, expert shares, active params
    "deepseek": Model("deepseek", "DeepSeekConfig", "DeepSeek", "DeepSeek", cache=True,
                      tiny=dict(multiple_of=8, n_expert=4, n_expert_per_token=2, n_group=2, topk_group=1,
                                first_k_dense=0),
                      sibling="mixtral", own_only=("balance", "expert_share", "active", "update_bias")),
    "gpt_oss": Model("gpt_oss", "GptOssConfig", "GptOss", "gpt-oss", cache=True,
                     tiny=dict(n_kv_head=2, multiple_of=8, sliding_window=5, n_expert=4), sibling="mixtral",
                     own_only=("balance", "expert_share", "active")),
    "gemma": Model("gemma", "GemmaConfig", "Gemma", "Gemma", cache=True, tiny=dict(multiple_of=8), sibling="llama"),
    "qwen3": Model("qwen3", "Qwen3Config", "Qwen3", "Qwen3", cache=True, tiny=dict(n_kv_head=2, multiple_of=8),
                   sibling="llama", own_only=("prompt_ids", "prompt-ids", "if tok", "tok and", "check(tok,")),
    "gemma3": Model("gemma3", "Gemma3Config", "Gemma3", "Gemma3", cache=True,
                    tiny=dict(multiple_of=8, sliding_window=5, sliding_window_pattern=2), sibling="gemma"),
}
CACHED = [name for name in MODELS if TABLE[name].cache]
SIBLINGS = [name for name in MODELS if TABLE[name].sibling]


@pytest.fixture(scope="module", params=MODELS)
def m(request):
    return TABLE[request.param]


def main(m, capsys, *argv):
    return run_main(m.module, capsys, *argv)


# -----------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("which, kwargs", [
    ("model", dict(n_embd=30, n_head=8)), ("model", dict(n_layer=0)), ("model", dict(block_size=-1)),
    ("model", dict(vocab_size=2.5)), ("model", dict(dropout=1.0)), ("model", dict(dropout=-0.1)),
    ("train", dict(batch_size=0)), ("train", dict(max_iters=0)), ("train", dict(eval_interval=0)),
    ("train", dict(eval_iters=0)), ("train", dict(lr=0.0)), ("train", dict(warmup_iters=-1)),
    ("train", dict(weight_decay=-0.1)), ("train", dict(grad_clip=-1.0)), ("train", dict(max_time=0.0)),
    ("train", dict(max_time=math.inf)), ("train", dict(dtype="float16")),
])
def test_configs_reject_impossible_values(m, which, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        m.config(**kwargs) if which == "model" else m.module.TrainConfig(**kwargs)


def test_train_config_defaults(m, monkeypatch):
    assert m.module.TrainConfig().out_dir == f"checkpoints/{m.name}"
    monkeypatch.delenv("CORPUS_DIR", raising=False)
    assert m.module.TrainConfig().data == "data/corpus"
    monkeypatch.setenv("CORPUS_DIR", "/novels")  # read when a config is made, not when the file is imported
    assert m.module.TrainConfig().data == "/novels"


# -----------------------------------------------------------------------------
# Model


def test_fused_attention_equals_written_out(m, monkeypatch):
    """Each query sees itself and the keys before it: the last T of T_k positions (a cache holds the rest);
    with a sliding window (an attention that takes one), the last `window` of those only."""
    generator = torch.Generator().manual_seed(0)
    takes = inspect.signature(m.module.attention).parameters
    for T, T_k in [(1, 1), (7, 7)] + ([(1, 7), (3, 7)] if m.cache else []):
        for window in [1, 3, 7, 100] if "window" in takes else [math.inf]:
            q, k, v = (torch.randn(2, 3, n, 8, generator=generator, dtype=torch.float64) for n in (T, T_k, T_k))
            args = (q, k, v, window) if "window" in takes else (q, k, v)
            if "scale" in takes:
                args += (1 / math.sqrt(8),)
            sinks = torch.full((3,), -math.inf, dtype=torch.float64)  # gpt-oss's, here taking no share
            if "sinks" in takes:
                sinks = torch.randn(3, generator=generator, dtype=torch.float64)
                args += (sinks,)
            monkeypatch.setattr(m.module, "FUSED", True)
            fused = m.module.attention(*args)
            monkeypatch.setattr(m.module, "FUSED", False)
            written_out = m.module.attention(*args)
            assert torch.allclose(fused, written_out, atol=1e-12)
            for i in range(T):
                seen = T_k - T + i + 1
                first = max(0, seen - window)
                scores = q[..., i : i + 1, :] @ k[..., first:seen, :].transpose(-2, -1) / math.sqrt(8)
                with_sink = torch.cat([scores, sinks.view(1, 3, 1, 1).expand(2, 3, 1, 1)], dim=-1)
                expected = with_sink.softmax(-1)[..., :-1] @ v[..., first:seen, :]
                assert torch.allclose(written_out[..., i : i + 1, :], expected, atol=1e-12)


def test_model_with_fused_kernels_equals_written_out(m, monkeypatch):
    """Logits and gradients, and the logits through a KV-cache filled in chunks."""
    model = randomize(m.build().double())
    idx = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        results = [logits.detach(), *(p.grad.clone() for p in model.parameters())]
        if m.cache:
            cache = m.module.KVCache(model.config, 3, "cpu", torch.float64)
            with torch.no_grad():
                results.append(torch.cat([model(idx[:, a:b], kv_cache=cache)[0]
                                          for a, b in pairwise([0, 5, 9, 10, 12])], 1))
        return results

    fused = run()
    monkeypatch.setattr(m.module, "FUSED", False)
    for a, b in zip(fused, run(), strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    if m.cache:  # the chunks through the cache give the full forward's logits
        assert torch.allclose(fused[0], fused[-1], atol=1e-10)


def test_forward_shapes_and_initial_loss(m):
    torch.manual_seed(0)
    model = m.build(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16)
    idx = torch.randint(0, 100, (3, 8))
    logits, loss = model(idx)
    assert logits.shape == (3, 8, 100) and loss is None
    _, loss = model(idx, targets=torch.randint(0, 100, (3, 8)))
    assert abs(loss.item() - math.log(100)) < 0.1  # at init, close to uniform over the vocabulary
    if m.window:  # defined on any length: block_size is the training context only
        assert model(torch.zeros(1, 9, dtype=torch.long))[0].shape == (1, 9, 100)
    else:
        with pytest.raises(ValueError):
            model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("fused", [True, False])
def test_changing_a_future_token_never_changes_earlier_logits(m, fused, monkeypatch):
    monkeypatch.setattr(m.module, "FUSED", fused)
    model = randomize(m.build(block_size=16, n_layer=3, n_embd=32, n_kv_head=1))
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (2, 16), generator=generator)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 38, (2,), generator=generator)) % 40
        before, after = model(idx)[0], model(changed)[0]
        assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)
        assert not torch.allclose(before[:, t], after[:, t], atol=1e-3)


def small_configs(m):
    return st.builds(
        lambda n_layer, n_kv_head, group, half_head, block_size, vocab_size, sliding_window, pattern: m.config(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_kv_head * group,
            n_kv_head=n_kv_head, n_embd=n_kv_head * group * 2 * half_head, multiple_of=4,
            sliding_window=sliding_window, sliding_window_pattern=pattern),
        n_layer=st.integers(1, 3), n_kv_head=st.integers(1, 2), group=st.integers(1, 3), half_head=st.integers(1, 4),
        block_size=st.integers(1, 12), vocab_size=st.integers(2, 60), sliding_window=st.integers(1, 12),
        pattern=st.integers(1, 4))  # where a file has local and global layers (gemma3): 1 all global, 4 all local


def token_lists(data, vocab_size, length, batch):
    row = st.lists(st.integers(0, vocab_size - 1), min_size=length, max_size=length)
    return torch.tensor(data.draw(st.lists(row, min_size=batch, max_size=batch)))


@pytest.mark.parametrize("m", CACHED, indirect=True)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_cached_decoding_gives_the_full_forwards_logits(m, data):
    """Prefill some tokens, then feed the rest in random chunks: within 1e-5, in float64 (float32's rounding
    alone passed 1e-5 on a gemma.py example hypothesis found); up to 4 times block_size with a sliding window,
    whose model and cache take any length."""
    config = data.draw(small_configs(m))
    model = randomize(getattr(m.module, m.model_class)(config), std=0.2, seed=data.draw(st.integers(0, 1000)))
    model = model.double()
    length = data.draw(st.integers(1, config.block_size * (4 if m.window else 1)))
    batch = data.draw(st.integers(1, 2))
    idx = token_lists(data, config.vocab_size, length, batch)
    cache = m.module.KVCache(config, batch, "cpu", torch.float64)
    pieces, done = [], 0
    while done < length:
        chunk = data.draw(st.integers(1, length - done))
        pieces.append(model(idx[:, done : done + chunk], kv_cache=cache)[0])
        done += chunk
    assert torch.allclose(torch.cat(pieces, dim=1), model(idx)[0], atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_greedy_generation_follows_the_cropped_window(m, data):
    """In float64, so that no near-tie flips a token. Each new token is the argmax of a
    full forward over the last block_size tokens, also past the context; with the
    cache (the default) and without it alike. With a sliding window (mistral), over the
    whole text instead, uncropped: the rolling cache is never re-filled."""
    config = data.draw(small_configs(m))
    model = randomize(getattr(m.module, m.model_class)(config).double(), std=0.5, seed=data.draw(st.integers(0, 99)))
    prompt_length = data.draw(st.integers(1, 2 * config.block_size))
    new_tokens = data.draw(st.integers(0, 2 * config.block_size + 3))
    prompt = token_lists(data, config.vocab_size, prompt_length, data.draw(st.integers(1, 2)))
    out = model.generate(prompt, new_tokens, temperature=0)
    assert out.shape == (prompt.size(0), prompt_length + new_tokens) and torch.equal(out[:, :prompt_length], prompt)
    for t in range(prompt_length, prompt_length + new_tokens):
        window = out[:, 0 if m.window else max(0, t - config.block_size) : t]
        assert torch.equal(out[:, t], model(window)[0][:, -1].argmax(-1))
    if m.cache:
        assert torch.equal(model.generate(prompt, new_tokens, temperature=0, use_cache=False), out)


def cache_elements(cache):
    """The numbers a KV-cache holds, whatever its buffers are called."""
    values = []
    for value in vars(cache).values():
        values += value if isinstance(value, list) else [value]
    return sum(value.numel() for value in values if isinstance(value, torch.Tensor))


@pytest.mark.parametrize("m", CACHED, indirect=True)
def test_a_short_texts_cache_holds_that_text_not_the_whole_context(m, monkeypatch):
    """A released model's context may be 128K tokens: generation's cache has room for the prompt and
    the new tokens, and for the whole context (or window) only when the text outgrows it."""
    model = m.build(block_size=32, sliding_window=16)
    caches = []

    def recorded(*args):
        caches.append(cache_class(*args))
        return caches[-1]

    cache_class = m.module.KVCache
    monkeypatch.setattr(m.module, "KVCache", recorded)
    prompt = torch.tensor([[1, 2, 3]])
    for new_tokens in (4, 40):
        model.generate(prompt, new_tokens, temperature=0)
    short, long = map(cache_elements, caches)
    # The cache of a model whose context and window are the 7 tokens
    seven = m.build(block_size=7, sliding_window=7).config
    assert short == cache_elements(cache_class(seven, 1, "cpu", torch.float32))
    assert long == cache_elements(cache_class(model.config, 1, "cpu", torch.float32))


def test_sampling_options(m):
    torch.manual_seed(0)
    model = randomize(m.build(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8), std=0.5)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(greedy[:, 3], model(prompt)[0][:, -1].argmax(-1))
    assert torch.equal(model.generate(prompt, 10, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 10, top_p=1e-9), greedy)
    assert model.generate(prompt, 10, top_k=10**6).shape == (2, 13)  # top_k is clamped to the vocabulary
    assert torch.equal(model.generate(prompt, 10, temperature=1e-39), greedy)  # near 0 is greedy, not NaN
    bad_options = [dict(temperature=t) for t in (-1.0, math.nan, math.inf)] + [dict(top_k=0)] + [
        dict(top_p=p) for p in (0.0, 1.5, math.nan)]
    for bad in bad_options:
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.generate(prompt, 1, **bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            m.module.sample_next(model(prompt)[0][:, -1], **bad)
    if not m.cache:
        with pytest.raises(TypeError):
            model.generate(prompt, 1, use_cache=True)

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    assert set(m.module.sample_next(logits, top_p=0.7).flatten().tolist()) == {0, 1}
    assert set(m.module.sample_next(logits, top_k=3).flatten().tolist()) == {0, 1, 2}
    assert set(m.module.sample_next(logits).flatten().tolist()) == {0, 1, 2, 3}
    assert set(m.module.sample_next(logits, temperature=0).flatten().tolist()) == {0}
    for tiny in (1e-39, 1e-300, 5e-324):  # below float32's smallest normal number, and below float64's
        assert set(m.module.sample_next(logits, temperature=tiny).flatten().tolist()) == {0}


# -----------------------------------------------------------------------------
# Data and training


def test_get_batch_gives_shifted_windows_and_splits_across_processes(m):
    tokens = torch.arange(1000, dtype=torch.int32).to(torch.uint16)
    x, y = m.module.get_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(16))
    both = [m.module.get_batch(tokens, 4, 16, torch.Generator().manual_seed(0), rank, 2)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(both), x)  # 2 processes with batch 4 = 1 process with batch 8


def test_sequential_batches_predict_every_token_once(m):
    for n, batch_size, block_size in [(50, 2, 8), (49, 3, 8), (5, 4, 8), (17, 1, 16)]:
        tokens = torch.arange(n, dtype=torch.int32).to(torch.uint16)
        ys = []
        for x, y in m.module.sequential_batches(tokens, batch_size, block_size):
            assert x.shape == y.shape and x.size(0) <= batch_size and x.size(1) <= block_size
            assert torch.equal(y, x + 1)
            ys.append(y.flatten())
        assert torch.equal(torch.cat(ys), torch.arange(1, n))


def test_lr_schedule_and_duration(m):
    """Warmup, then a cosine that reaches lr / 10 at max_iters, whatever max_iters is."""
    for max_iters in (100, 200):
        cfg = m.module.TrainConfig(lr=1e-3, warmup_iters=10, max_iters=max_iters)
        lrs = [m.module.get_lr(step, cfg) for step in range(max_iters + 20)]
        assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
        assert all(a < b for a, b in pairwise(lrs[:10]))  # warmup rises
        assert all(a > b for a, b in pairwise(lrs[10 : max_iters + 1]))  # cosine falls
        assert lrs[10 + (max_iters - 10) // 2] == pytest.approx(0.55e-3)  # halfway down from 1e-3 to 1e-4
        assert lrs[max_iters] == lrs[-1] == pytest.approx(1e-4)
    timed = m.module.TrainConfig(lr=1e-3, warmup_iters=10, max_iters=100, max_time=50.0)  # a time budget
    for rate in (0.5, 2, 4):  # steps a second: the decay ends with the budget, at 25, 100 or 200 steps
        by_steps = replace(timed, max_time=None, max_iters=round(50 * rate))
        for step in (0, 5, 9, 10, 20, 24, 25, 60, 99, 100, 150, 200, 250):
            assert m.module.get_lr(step, timed, step / rate) == pytest.approx(m.module.get_lr(step, by_steps))
    assert m.module.get_lr(5, timed, 60.0) == pytest.approx(6e-4)  # warmup counts steps, whatever the clock
    assert m.module.get_lr(20, timed, 50.0) == pytest.approx(1e-4)  # the floor as time runs out
    duration = m.module.duration
    assert duration("90s") == 90 and duration("30m") == 1800 and duration("1.5h") == 5400 and duration("45") == 45
    for bad in ("soon", "0m", "-5s", "1d", ""):  # not a duration, or one that TrainConfig refuses
        with pytest.raises(ValueError):
            m.module.TrainConfig(max_time=duration(bad))


def test_weight_decay_only_on_matrices(m):
    model = m.build(vocab_size=10, block_size=4, n_head=2, n_embd=4)
    optimizer = m.module.configure_optimizer(model, m.module.TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in not_decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(model.parameters()))


def test_evaluate_gives_loss_and_bits_per_character(m):
    torch.manual_seed(0)
    model = m.build(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8)
    char_counts = torch.randint(0, 4, (20,))
    batches = [(torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8))) for _ in range(3)]
    loss, bpc = m.module.evaluate(model, batches, char_counts, torch.device("cpu"))
    nats = sum(F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum") for x, y in batches)
    chars = sum(char_counts[y].sum() for _, y in batches)
    assert loss == pytest.approx(nats.item() / 48)
    assert bpc == pytest.approx(nats.item() / math.log(2) / chars.item())


def test_overfits_one_batch(m):
    torch.manual_seed(0)
    model = m.build(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    optimizer = m.module.configure_optimizer(model, m.module.TrainConfig(lr=3e-3, weight_decay=0.0),
                                             torch.device("cpu"))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05  # from ln(64) = 4.16: random targets, learned by heart


def test_resume_continues_exactly(m, corpus, tmp_path, capsys):
    """8 steps straight == 4 steps, then --resume for 4 more: the same weights and
    optimizer state, bit for bit (with dropout on). The first 4 steps are warmup, whose
    learning rates do not depend on --max-iters (the cosine after it does)."""
    common = ["--warmup-iters", "4", "--eval-interval", "3", "--dropout", "0.1"]
    assert main(m, capsys, *train_args(corpus, tmp_path / "straight", *common, "--max-iters", 8))[0] == 0
    code, out, _ = main(m, capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", 4))
    assert code == 0 and f"done: {tmp_path / 'split' / 'ckpt.pt'} is at step 4" in out
    assert checkpoint(tmp_path / "split")["step"] == 4
    code, out, _ = main(m, capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", 8, "--resume"))
    assert code == 0 and f"resuming from {tmp_path / 'split' / 'ckpt.pt'} at step 4" in out
    straight, split = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "split")
    assert straight["model"] == split["model"] == m.name and straight["step"] == split["step"] == 8
    assert set(split) == {"model", "config", "tokenizer", "step", "weights", "optimizer", "rng", "elapsed", "max_time"}
    assert set(split["rng"]) == {"torch", "batches"}  # dropout's and the batches' generators
    assert all(torch.equal(w, split["weights"][name]) for name, w in straight["weights"].items())
    for a, b in zip(straight["optimizer"]["state"].values(), split["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert (tmp_path / "split" / "log.csv").read_text().count("\n") == 1 + 4  # header; evals at 3, 4, 6, 8


def test_a_new_run_trains_its_own_tokenizer_and_a_resumed_one_keeps_it(m, corpus, tmp_path, capsys):
    """A tokenizer left in the folder by a run on other data is replaced, not reused; a resumed
    run keeps its own, even one from before the folder's record (tokenizer.source.json)."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    bpe.Tokenizer.train(["Мама мыла раму."], 300).save(out_dir / "tokenizer.json")
    code, out, _ = main(m, capsys, *train_args(corpus, out_dir, "--max-iters", 2))
    assert code == 0 and "training anew" in out
    assert bpe.Tokenizer.load(out_dir / "tokenizer.json").vocab_size == 300
    (out_dir / "tokenizer.source.json").unlink()
    code, out, _ = main(m, capsys, *train_args(corpus, out_dir, "--max-iters", 4, "--resume"))
    assert code == 0 and "resuming from" in out and "training a" not in out


def last_logged_step(out_dir):
    return int((out_dir / "log.csv").read_text().splitlines()[-1].split(",")[0])


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(m, corpus, tmp_path, capsys):
    """Ctrl-C ends the step, evaluates and saves. All runs here stay in warmup, so that
    the learning rates do not depend on --max-iters."""
    out_dir, warmup = tmp_path / "interrupted", ["--warmup-iters", 1000, "--lr", 0.3]
    process = subprocess.Popen([sys.executable, str(ROOT / f"{m.name}.py"),
                                *train_args(corpus, out_dir, *warmup, "--max-iters", 100000)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    for line in process.stdout:
        if line.startswith("step 1/"):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    step = checkpoint(out_dir)["step"]
    assert "stopping after this step" in err and "Traceback" not in err
    assert f"stopped by Ctrl-C at step {step}: saved {out_dir / 'ckpt.pt'}; --resume continues" in out
    assert f"eval step {step}:" in out and last_logged_step(out_dir) == step
    more = [*warmup, "--max-iters", step + 2]
    assert main(m, capsys, *train_args(corpus, out_dir, *more, "--resume"))[0] == 0
    assert main(m, capsys, *train_args(corpus, tmp_path / "straight", *more))[0] == 0
    resumed, straight = weights(m.module, out_dir), weights(m.module, tmp_path / "straight")
    assert all(torch.equal(w, resumed[name]) for name, w in straight.items())


def test_max_time_stops_cleanly(m, corpus, tmp_path, capsys, monkeypatch):
    """On a clock that moves 10 s a call, the first step ends past --max-time 5s: it is
    evaluated, logged and saved, and the ETA is 0, not negative."""
    monkeypatch.setattr(m.module, "time", SimpleNamespace(time=count(0, 10).__next__))
    code, out, _ = main(m, capsys, *train_args(corpus, tmp_path, "--max-iters", 100000, "--max-time", "5s"))
    assert code == 0 and checkpoint(tmp_path)["step"] == last_logged_step(tmp_path) == 1
    assert re.search(r"^eval step 1: .* \| ETA 0:00:00$", out, re.MULTILINE), out
    assert f"done: {tmp_path / 'ckpt.pt'} is at step 1" in out
    # The step log counts the budget's seconds, not --max-iters.
    assert re.search(r"^step 1 \(\d+s of 5s\) \| loss", out, re.MULTILINE), out


def test_a_time_budget_replaces_max_iters_and_resume_continues_its_clock(m, corpus, tmp_path, capsys, monkeypatch):
    """--max-time, not --max-iters, ends the run, with the schedule at its floor; the checkpoint keeps the
    budget and the seconds trained, so a resumed run goes on with the same clock, and one whose time is spent stops."""
    monkeypatch.setattr(m.module, "time", SimpleNamespace(time=count(0, 1).__next__))  # 1 s a call
    argv = train_args(corpus, tmp_path, "--max-iters", 3, "--eval-interval", 100)
    code, out, _ = main(m, capsys, *argv, "--max-time", "60s")
    assert code == 0 and "eval step 3:" not in out  # --max-iters 3 counts nothing here
    saved, last = checkpoint(tmp_path), list(csv.DictReader((tmp_path / "log.csv").open()))[-1]
    assert saved["step"] > 3 and 60 < saved["elapsed"] < 70 and float(last["elapsed_s"]) > 60
    lr_floor = m.module.TrainConfig().lr / 10
    assert float(last["lr"]) == pytest.approx(lr_floor, rel=0.02)  # the last step's rate
    code, out, _ = main(m, capsys, *argv, "--resume", "--max-iters", "1000")  # the checkpoint's budget: spent
    assert code == 0 and checkpoint(tmp_path)["step"] == saved["step"] and f"at step {saved['step']}" in out
    assert main(m, capsys, *argv, "--resume", "--max-time", "90s")[0] == 0  # a larger one goes on
    assert checkpoint(tmp_path)["step"] > saved["step"] and checkpoint(tmp_path)["max_time"] == 90


def test_two_processes_on_gloo_train_like_one_with_the_double_batch(m, corpus, tmp_path, capsys):
    run = ["--max-iters", 4, "--warmup-iters", 2, "--eval-interval", 2, "--dtype", "float32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = train_args(corpus, tmp_path / "ddp", *run, "--batch-size", 2)
    result = subprocess.run([*torchrun, ROOT / f"{m.name}.py", *ddp], capture_output=True, text=True,
                            env=SUBPROCESS_ENV, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(m, capsys, *train_args(corpus, tmp_path / "single", *run, "--batch-size", 4))[0] == 0
    assert checkpoint(tmp_path / "ddp")["step"] == 4
    two, one = weights(m.module, tmp_path / "ddp"), weights(m.module, tmp_path / "single")
    for name, w in one.items():
        assert torch.allclose(w, two[name], atol=2e-5), name


# -----------------------------------------------------------------------------
# Command line


def test_cli_train_sample_and_a_bad_eval(m, corpus, tmp_path):
    out_dir = tmp_path / "run"
    result = run_cli(m.name, *train_args(corpus, out_dir, "--max-iters", 4, "--eval-interval", 2))
    assert result.returncode == 0, result.stderr
    assert f"{m.name}:" in result.stdout and "step 1/4 | loss" in result.stdout
    assert re.search(r"^eval step 4: train loss .* bpc \| val loss .* bpc \| .* tok/s \| elapsed .* \| ETA 0:00:00$",
                     result.stdout, re.MULTILINE), result.stdout
    assert f"done: {out_dir / 'ckpt.pt'} is at step 4" in result.stdout
    assert {"tokenizer.json", "train.bin", "val.bin", "ckpt.pt", "log.csv"} <= {p.name for p in out_dir.iterdir()}
    assert (out_dir / "log.csv").read_text().startswith("step,lr,train_loss,train_bpc,val_loss,val_bpc")

    result = run_cli(m.name, "sample", "--out-dir", out_dir, "--prompt", "Мой дядя", "--max-new-tokens", 20,
                     "--top-k", 100000, "--top-p", 0.9, "--device", "cpu", PYTHONIOENCODING="cp1252")  # Windows
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Мой дядя") and re.fullmatch(r"\d+ tokens in \d+\.\d\ds\n", result.stderr)

    (out_dir / "ckpt.pt").write_bytes(b"\x00" * 100)  # corrupt
    result = run_cli(m.name, "eval", "--out-dir", out_dir, "--data", corpus, "--device", "cpu")
    assert one_line_error(result.returncode, result.stderr, "corrupt"), result.stderr  # no Traceback


def save(m, run, model):
    """model as run's checkpoint, by save_checkpoint."""
    optimizer = m.module.configure_optimizer(model, m.module.TrainConfig(), torch.device("cpu"))
    tok = bpe.Tokenizer.load(run / "tokenizer.json")
    m.module.save_checkpoint(run / "ckpt.pt", m.module.Run(model, optimizer, tok, torch.Generator(), step=1))


def test_greedy_sample_is_the_same_with_any_seed_and_without_the_cache(m, trained, tmp_path, capsys, monkeypatch):
    """From random weights, whose greedy tokens vary, past the context of 16 tokens:
    <|endoftext|>, where sample stops, is never picked here, until it is picked always."""
    run = shutil.copytree(trained(m.name), tmp_path / "run")
    save(m, run, randomize(m.module.load_trained(run, torch.device("cpu"))[0], std=0.5))
    eot, sample_next = bpe.Tokenizer.load(run / "tokenizer.json").eot_id, m.module.sample_next
    monkeypatch.setattr(m.module, "sample_next", lambda logits, *options: sample_next(
        logits.index_fill(-1, torch.tensor([eot]), -math.inf), *options))
    argv = ["sample", "--out-dir", run, "--max-new-tokens", 30, "--temperature", 0, "--device", "cpu"]
    code, out, err = main(m, capsys, *argv, "--prompt", "Мой дядя")
    assert code == 0 and out.startswith("Мой дядя") and len(out) > len("Мой дядя\n") and "30 tokens in" in err
    assert main(m, capsys, *argv, "--prompt", "Мой дядя", "--seed", 7)[:2] == (0, out)
    (tmp_path / "prompt.txt").write_text("Мой дядя", encoding="utf-8")
    assert main(m, capsys, *argv, "--prompt-file", tmp_path / "prompt.txt")[:2] == (0, out)
    if m.cache:
        assert main(m, capsys, *argv, "--prompt", "Мой дядя", "--no-cache")[:2] == (0, out)
    else:
        assert one_line_error(*main(m, capsys, *argv, "--no-cache")[::2], "--no-cache")
    monkeypatch.setattr(m.module, "sample_next", lambda logits, *options: torch.full_like(logits[:, :1], eot).long())
    code, out, err = main(m, capsys, *argv, "--prompt", "Мой дядя")
    assert code == 0 and out == "Мой дядя\n" and err.startswith("1 tokens in")


def test_eval_of_the_validation_split_and_of_a_text(m, trained, corpus, tmp_path, capsys):
    code, out, _ = main(m, capsys, "eval", "--out-dir", trained(m.name), "--data", corpus, "--device", "cpu")
    assert code == 0 and "validation split" in out and "bits per character" in out
    text = tmp_path / "t.txt"
    text.write_text(" ".join(SENTENCES), encoding="utf-8")
    code, out, _ = main(m, capsys, "eval", "--out-dir", trained(m.name), "--text", text, "--device", "cpu")
    n_tokens = len(bpe.Tokenizer.load(trained(m.name) / "tokenizer.json").encode(" ".join(SENTENCES)))
    assert code == 0 and "bits per character" in out and f"({n_tokens:,} tokens)" in out


def test_help_lists_every_flag_with_its_default(m, capsys):
    commands = m.module.build_parser()._subparsers._group_actions[0].choices
    for command, parser in commands.items():
        code, out, _ = main(m, capsys, command, "--help")
        assert code == 0
        help_text = " ".join(out.split()).replace("- ", "-")  # argparse wraps at hyphens
        for action in parser._actions:
            if action.dest != "help":
                flag_help = " ".join(parser._get_formatter()._get_help_string(action).split())
                assert action.option_strings[0] in help_text and "default: " in flag_help, action.dest
                assert (flag_help % {"default": action.default}).replace("- ", "-") in help_text, action.dest


def other_tokenizer(m, run):
    bpe.Tokenizer.train([" ".join(SENTENCES[:3])], 280).save(run / "tokenizer.json")


def garbage_checkpoint(m, run):
    (run / "ckpt.pt").write_bytes(b"not a checkpoint at all")


def truncated_checkpoint(m, run):
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[: len(data) // 2])


def foreign_checkpoint(m, run):
    torch.save({"weights": {"a": torch.zeros(2)}}, run / "ckpt.pt")


def shape_mismatch_checkpoint(m, run):
    """A checkpoint whose weights are a narrower model's than its config says."""
    config = m.module.load_trained(run, torch.device("cpu"))[0].config
    narrow = m.build(**{**config.__dict__, "n_embd": 16})
    narrow.config = config
    save(m, run, narrow)


def corpus_of(data):
    def spoil(m, run):
        (run / "corpus").mkdir()
        for i in range(3):
            (run / "corpus" / f"Author_Novel{i}.txt").write_bytes(data)
    return spoil


def non_finite_weights(m, run):
    saved = checkpoint(run)
    next(iter(saved["weights"].values())).view(-1)[0] = math.nan
    torch.save(saved, run / "ckpt.pt")


def damaged_val_split(m, run):
    (run / "val.bin").write_bytes(b"abc")  # one token and a stray byte


def blank_prompt(m, run):
    (run / "blank.txt").write_text(" \n", encoding="utf-8")


NEW = ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new"]


@pytest.mark.parametrize("spoil, argv, key", [
    (None, ["train", "--data", "{tmp}/nowhere", "--out-dir", "{tmp}/new"], "nowhere"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY], "--resume continues it"),
    (corpus_of(b" \n"), ["train", "--data", "{run}/corpus", "--out-dir", "{tmp}/new"], "empty"),
    (corpus_of("Ça déjà".encode("latin-1")), ["train", "--data", "{run}/corpus", "--out-dir", "{tmp}/new"], "UTF-8"),
    (None, ["sample", "--out-dir", "{tmp}/empty"], "no checkpoint at"),
    (None, ["eval", "--out-dir", "{tmp}/empty"], "no checkpoint at"),
    (None, [*NEW, "--resume"], "no checkpoint at"),
    (other_tokenizer, ["sample", "--out-dir", "{run}"], "tokenizer"),
    (other_tokenizer, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY, "--resume"], "tokenizer"),
    (garbage_checkpoint, ["sample", "--out-dir", "{run}"], "corrupt"),
    (truncated_checkpoint, ["eval", "--out-dir", "{run}"], "corrupt"),
    (foreign_checkpoint, ["sample", "--out-dir", "{run}"], "ckpt.pt"),
    (shape_mismatch_checkpoint, ["sample", "--out-dir", "{run}"], "ckpt.pt"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY, "--n-layer", "3", "--resume"], "another shape"),
    (None, [*NEW, "--n-embd", "30"], "n_embd"),
    (None, [*NEW, "--dropout", "1"], "dropout"),
    (None, [*NEW, "--batch-size", "0"], "batch_size"),
    (None, [*NEW, "--max-time", "soon"], "soon"),
    (None, [*NEW, "--max-time", "0m"], "max_time"),
    (None, [*NEW, "--dtype", "float16"], "float16"),
    (None, [*NEW, "--device", "tpu"], "tpu"),
    (None, [*NEW, "--block-size", "100000"], "too few for a window"),
    (non_finite_weights, ["sample", "--out-dir", "{run}"], "NaN or inf weights"),
    (non_finite_weights, ["eval", "--out-dir", "{run}"], "NaN or inf weights"),
    (None, ["sample", "--out-dir", "{run}", "--temperature", "-1"], "temperature"),
    (None, ["sample", "--out-dir", "{run}", "--temperature", "nan"], "temperature"),
    (None, ["sample", "--out-dir", "{run}", "--temperature", "inf"], "temperature"),
    (None, ["sample", "--out-dir", "{run}", "--top-p", "nan"], "top_p"),
    (None, ["sample", "--out-dir", "{run}", "--top-p", "0"], "top_p"),
    (None, ["sample", "--out-dir", "{run}", "--top-k", "0"], "top_k"),
    (None, ["sample", "--out-dir", "{run}", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (blank_prompt, ["sample", "--out-dir", "{run}", "--prompt", "x", "--prompt-file", "{run}/blank.txt"],
     "not both"),
    # cp1251 bytes of a terminal that is not UTF-8, as Python puts them into argv
    (None, ["sample", "--out-dir", "{run}", "--prompt", "\udcc4\udce0"], "--prompt-file"),
    # An --out-dir that cannot be made fails before the BPE is trained.
    (None, ["train", "--data", "{corpus}", "--out-dir", "{run}/ckpt.pt/new", *TINY], "ckpt.pt/new"),
    (None, ["sample", "--out-dir", "{run}", "--prompt-file", "{tmp}/none.txt"], "none.txt"),
    (None, ["eval", "--out-dir", "{run}", "--text", "{tmp}/none.txt"], "none.txt"),
    (blank_prompt, ["sample", "--out-dir", "{run}", "--prompt-file", "{run}/blank.txt"], "blank.txt"),
    (None, ["eval", "--out-dir", "{run}", "--batch-size", "0"], "--batch-size"),
    (damaged_val_split, ["eval", "--out-dir", "{run}"], "no token to predict"),
])
def test_bad_input_gives_one_line_and_exit_1(m, spoil, argv, key, trained, corpus, tmp_path, capsys):
    run = tmp_path / f"{m.name}-run"
    shutil.copytree(trained(m.name), run)
    if spoil:
        spoil(m, run)
    code, _, err = main(m, capsys, *[a.format(tmp=tmp_path, run=run, corpus=corpus) for a in argv])
    assert one_line_error(code, err, key), err


def test_bad_sampling_flags_fail_before_the_prompt_is_printed(m, trained, capsys):
    code, out, err = main(m, capsys, "sample", "--out-dir", trained(m.name), "--prompt", "Мой дядя",
                          "--top-p", "2")
    assert one_line_error(code, err, "top_p") and out == "", err


def test_a_prompt_may_start_with_a_dash_as_dialogue_does(m, trained, capsys):
    for prompt in ["-Да", "- Да, сказал он"]:
        code, out, err = main(m, capsys, "sample", "--out-dir", trained(m.name), "--prompt", prompt,
                              "--max-new-tokens", 3, "--device", "cpu")
        assert code == 0 and out.startswith(prompt), err


def test_flags_are_never_abbreviated(m, corpus, tmp_path, capsys):
    code, _, err = main(m, capsys, *train_args(corpus, tmp_path, "--max-iter", 3))
    assert one_line_error(code, err, "unrecognized arguments: --max-iter 3"), err


@pytest.mark.parametrize("message", ["DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                     "800000000000 bytes. Error code 12 (Cannot allocate memory)", None])
def test_running_out_of_memory_is_one_line(m, message, corpus, tmp_path, capsys, monkeypatch):
    """The CPU's allocator raises a plain RuntimeError; CUDA and MPS raise torch.OutOfMemoryError."""
    def allocate(*args):
        if message:
            raise RuntimeError(message)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 ...")

    monkeypatch.setattr(m.module, "prepare_data", allocate)
    code, _, err = main(m, capsys, *train_args(corpus, tmp_path))
    assert one_line_error(code, err, "out of memory: try a smaller --batch-size"), err


def test_any_other_runtime_error_is_a_bug_and_keeps_its_traceback(m, corpus, tmp_path, capsys, monkeypatch):
    def fail(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(m.module, "prepare_data", fail)
    with pytest.raises(RuntimeError, match="shapes"):
        m.module.main(train_args(corpus, tmp_path))


def test_a_closed_pipe_ends_sample_quietly(m, trained):
    """`sample | head -c 20`: no error, no traceback, as Unix tools end."""
    argv = ["sample", "--out-dir", trained(m.name), "--max-new-tokens", 100000, "--device", "cpu"]
    argv = [sys.executable, ROOT / f"{m.name}.py", *map(str, argv)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SUBPROCESS_ENV,
                          cwd=ROOT) as process:
        process.stdout.read(20)
        process.stdout.close()
        err = process.stderr.read().decode()
    assert process.returncode == 141 and err == "", err


def test_a_huge_max_new_tokens_needs_no_memory_ahead(m):
    """10**12 new tokens would be 8 TB of ids preallocated: a stream holds only what it needs."""
    torch.manual_seed(0)
    model = m.build().eval()
    idx = torch.randint(0, 40, (1, 5))
    expected = model.generate(idx, 20, temperature=0.0)[:, 5:]
    for cache in [True, False][: 1 + m.cache]:
        options = {"use_cache": cache} if m.cache else {}
        stream = model.stream(idx, 10**12, temperature=0.0, **options)
        assert torch.equal(torch.cat(list(itertools.islice(stream, 20)), dim=1), expected)


@pytest.mark.parametrize("m", CACHED, indirect=True)
def test_no_cache_does_not_read_as_off_by_default(m, capsys):
    _, out, _ = main(m, capsys, "sample", "--help")
    assert "--cache, --no-cache generate with the KV-cache (default: True)" in " ".join(out.split())
    assert m.module.build_parser().parse_args(["sample"]).cache


@pytest.mark.parametrize("command", ["sample", "eval", "train"])
def test_other_models_checkpoints_are_refused(m, command, trained, corpus, tmp_path, capsys):
    for other in MODELS:
        if other != m.name:
            run = shutil.copytree(trained(other), tmp_path / other)
            argv = train_args(corpus, run, "--resume") if command == "train" else [command, "--out-dir", run]
            code, _, err = main(m, capsys, *argv)
            assert one_line_error(code, err, f"checkpoint of {other}"), err


# -----------------------------------------------------------------------------
# Own text, and the failures people hit in practice


def test_one_text_file_is_a_corpus_and_eval_scores_the_runs_own_split(m, tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text("\n".join(f"{i}. {SENTENCES[i % 12]}" for i in range(200)), encoding="utf-8")
    run = tmp_path / "run"
    code, out, err = main(m, capsys, *train_args(story, run, "--max-iters", 2, "--eval-interval", 2))
    (_, train_text), (val_name, val_text) = [split[0] for split in bpe.split_corpus(bpe.read_corpus(story))]
    assert code == 0 and f"validation split: {val_name}\n" in out, err
    assert val_name.startswith("story.txt from line ") and 0.1 <= len(val_text) / len(story.read_text()) < 0.11

    code, out, _ = main(m, capsys, "eval", "--out-dir", run, "--device", "cpu", "--data", story)
    code_own, out_own, err = main(m, capsys, "eval", "--out-dir", run, "--device", "cpu")  # no --data, no corpus
    assert code == code_own == 0 and out_own.startswith(f"validation split of {run}: "), err
    assert out.split(": ", 1)[1] == out_own.split(": ", 1)[1]  # the same loss, bits per character and tokens


def test_a_byte_order_mark_is_not_text(m, trained, tmp_path, capsys):
    """Notepad starts its UTF-8 files with U+FEFF: prompt files and eval --text drop it."""
    for name, text in [("plain.txt", "Мой дядя"), ("bom.txt", "\ufeffМой дядя")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    outputs = set()
    for name in ("plain.txt", "bom.txt"):
        for command in (["sample", "--prompt-file", tmp_path / name, "--temperature", 0, "--max-new-tokens", 5],
                        ["eval", "--text", tmp_path / name]):
            code, out, err = main(m, capsys, *command, "--out-dir", trained(m.name), "--device", "cpu")
            assert code == 0 and "\ufeff" not in out, err
            outputs.add(out.replace(name, "FILE"))
    assert len(outputs) == 2 and any(out.startswith("Мой дядя") for out in outputs)


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(m, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(m, capsys, *train_args(corpus, run, "--max-iters", 2, "--eval-interval", 2))[0] == 0
    code, out, err = main(m, capsys, *train_args(corpus, run, "--max-iters", 40, "--eval-interval", 2, "--lr", 1e9,
                                                  "--resume"))  # far too high: NaN within a few steps
    assert one_line_error(code, err, "not finite at step") and "try a lower --lr" in err, err
    diverged_at = int(re.search(r"step (\d+)", err).group(1))
    saved = checkpoint(run)  # the last evaluation before the NaN, and finite
    assert saved["step"] == (diverged_at - 1) // 2 * 2 and all(w.isfinite().all() for w in saved["weights"].values())
    assert main(m, capsys, "sample", "--out-dir", run, "--max-new-tokens", 3, "--device", "cpu")[0] == 0


@pytest.mark.parametrize("console", ["cp1252", "cp1251", "ascii"])
def test_text_goes_out_as_utf8_whatever_the_console(m, trained, tmp_path, monkeypatch, console):
    """Windows encodes a redirected stdout in its ANSI code page, which has no Cyrillic (cp1252) or no
    Latin accents (cp1251); the commands write UTF-8 all the same."""
    text = tmp_path / "глава.txt"
    text.write_text("Ёлка, café", encoding="utf-8")
    for argv in (["sample", "--prompt", "Ёлка, café", "--max-new-tokens", 5], ["eval", "--text", text]):
        stdout = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stdout, encoding=console))
        assert m.module.main([*map(str, argv), "--out-dir", str(trained(m.name)), "--device", "cpu"]) == 0
        sys.stdout.flush()
        assert stdout.getvalue().decode("utf-8").startswith(("Ёлка, café", f"{text}: loss"))


# -----------------------------------------------------------------------------
# Outside the model, each file is its sibling's code
#
# The files have the same sections. The config, the model and the pretrained
# weights differ by design; the rest (data, training, sampling, command line;
# TrainConfig's fields, not the defaults tuned per model) must be the sibling's code
# after renaming, so that `diff gpt1.py gpt2.py` shows a reader only what the
# architecture changed. Only features that TABLE's words mark may differ there: a
# hunk whose lines name one of this file's own (own_only), and one where the sibling
# names one of its own (sibling_only) and this file only leaves tokens out.

SECTIONS = ["Config", "Model", "Data", "Training", "Sampling", "Command line"]
SHARED_SECTIONS = ["Data", "Training", "Sampling", "Command line"]


def as_ours(m, source):
    """The sibling's text with this file's names."""
    sibling = TABLE[m.sibling]
    # A class name that is also the title (Mixtral): called or read from, it is the class.
    source = re.sub(rf"(?<![\w-]){re.escape(sibling.model_class)}(?=[(.])", m.model_class, source)
    for theirs, ours in [(sibling.title, m.title), (sibling.config_class, m.config_class),
                         (sibling.model_class, m.model_class), (sibling.name, m.name)]:
        source = re.sub(rf"(?<![\w-]){re.escape(theirs)}(?![\w-])", ours, source)  # GPT, not GPT-3
    return source


def top_level_units(source):
    """{name: (section, source text)} of a file's top-level statements: functions and
    classes (with their decorators) and assignments by name, others by their first
    line; and the section titles (up to a colon)."""
    lines = source.splitlines(keepends=True)
    headers = [(i + 1, lines[i + 1].strip("# \n").split(":")[0]) for i, line in enumerate(lines[:-1])
               if re.fullmatch(r"# -{20,}\n", line)]
    units = {}
    for node in ast.parse(source).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        name = getattr(node, "name", None) or " = ".join(targets) or lines[node.lineno - 1].strip()
        section = max((h for h in headers if h[0] < first), default=(0, "preamble"))[1]
        units[name] = (section, "".join(lines[first - 1 : node.end_lineno]))
    return units, [name for _, name in headers]


def only_lacks(ours, theirs):
    """Whether text ours is text theirs with some tokens left out (whitespace aside)."""
    token = re.compile(r"\w+|[^\w\s]")
    remaining = iter(token.findall(theirs))
    return all(t in remaining for t in token.findall(ours))


def without_tuned_defaults(a, b):
    """TrainConfig's lines a and b, with each field whose default differs (tuned per model by design)
    cut to its name and type, in both: its help may say why."""
    field = re.compile(r"(    \w+: [^=]+)= arg\(([^,]+),")
    defaults = [{f[1]: f[2] for f in map(field.match, lines) if f} for lines in (a, b)]
    return ([f[1] if f and defaults[0].get(f[1], f[2]) != defaults[1].get(f[1], f[2]) else line
             for f, line in zip(map(field.match, lines), lines)] for lines in (a, b))


def unmirrored_changes(m, our_source, sibling_source):
    """What differs between the two files outside the model and is not by design:
    a list of readable problems, empty when the files are in step."""
    ours, our_sections = top_level_units(our_source)
    theirs, their_sections = top_level_units(as_ours(m, sibling_source))
    problems = []
    if any([s for s in sections if s in SECTIONS] != SECTIONS for sections in (our_sections, their_sections)):
        problems.append(f"sections: {m.name}.py {our_sections}, {m.sibling}.py {their_sections}")

    def marked(text, words):  # about a feature of one file's own
        return any(word in text for word in words)

    for name in {**ours, **theirs}:
        here, there = ours.get(name), theirs.get(name)
        if not any(unit and unit[0] in SHARED_SECTIONS for unit in (here, there)):
            continue
        if not there or not here:
            if not marked(name, m.own_only if here else m.sibling_only):
                problems.append(f"{name} ({(here or there)[0]}) is in {m.name if here else m.sibling}.py only")
        elif here[0] != there[0]:
            problems.append(f"{name} is under {here[0]} in {m.name}.py, under {there[0]} in {m.sibling}.py")
        else:
            a, b = here[1].splitlines(), there[1].splitlines()
            if name == "TrainConfig":
                a, b = without_tuned_defaults(a, b)
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
                ours_part, theirs_part = "\n".join(a[i1:i2]), "\n".join(b[j1:j2])
                # Our feature's lines may say anything; where the sibling's feature is, we may only lack tokens.
                if tag == "equal" or marked(ours_part, m.own_only) or (
                        marked(theirs_part, m.sibling_only) and only_lacks(ours_part, theirs_part)):
                    continue
                problems.append("\n".join([f"{name}:", *("- " + s for s in a[i1:i2]), *("+ " + s for s in b[j1:j2])]))
    return problems


def sources(m):
    return [(ROOT / f"{name}.py").read_text(encoding="utf-8") for name in (m.name, m.sibling)]


@pytest.mark.parametrize("m", SIBLINGS, indirect=True)
def test_outside_the_model_each_file_is_its_siblings_code(m):
    problems = unmirrored_changes(m, *sources(m))
    assert not problems, f"{m.name}.py and {m.sibling}.py are out of step:\n\n" + "\n\n".join(problems)


def edited(source, name, line=None):
    """source with `line` added at the end of its top-level function `name`, or without that function."""
    node = next(n for n in ast.parse(source).body if getattr(n, "name", None) == name)
    lines, last = source.splitlines(keepends=True), node.body[-1]
    if line is None:
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        return "".join(lines[: first - 1] + lines[node.end_lineno :])
    return "".join(lines[: last.end_lineno] + [" " * last.col_offset + line + "\n"] + lines[last.end_lineno :])


@pytest.mark.parametrize("m", SIBLINGS, indirect=True)
def test_the_check_catches_an_unmirrored_change(m):
    """Edits to the two files as they are now: each stray one adds one problem; a
    feature that TABLE marks as one file's own adds none."""
    ours, sibling = sources(m)
    found = unmirrored_changes(m, ours, sibling)

    def new_problems(our_source=ours, sibling_source=sibling):
        return [p for p in unmirrored_changes(m, our_source, sibling_source) if p not in found]

    units = top_level_units(ours)[0]
    name = next(n.name for n in ast.parse(sibling).body
                if isinstance(n, ast.FunctionDef) and units.get(n.name, ("",))[0] == "Training")
    for our_line, sibling_line in [(None, "x = 1"), ("x = 1", None), ("x = 2", "x = 1")] + [
            ("x = 2", f"x = {word}") for word in m.sibling_only[:1]]:  # a change hidden behind a feature
        problems = new_problems(edited(ours, name, our_line) if our_line else ours,
                                edited(sibling, name, sibling_line) if sibling_line else sibling)
        assert len(problems) == 1 and problems[0].startswith(f"{name}:"), problems
    assert new_problems(our_source=edited(ours, name)) == [f"{name} (Training) is in {m.sibling}.py only"]
    extra = ours + "\n\ndef extra():\n    pass\n"
    assert new_problems(our_source=extra) == [f"extra (Command line) is in {m.name}.py only"]
    features = [(sibling, "sibling_source", w) for w in m.sibling_only[:1]]
    features += [(ours, "our_source", w) for w in m.own_only[:1]]
    for source, side, word in features:
        extended = edited(source, name, f"{word}()") + f"\n\ndef {word}_more():\n    pass\n"
        assert new_problems(**{side: extended}) == []
