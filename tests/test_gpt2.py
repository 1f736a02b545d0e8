"""Tests for gpt2.py: the model's math, the KV-cache, training and resume,
DistributedDataParallel on 2 CPU processes, and the command line end to end.

Everything runs on tiny models and on a few small Russian texts written here;
nothing needs the real corpus. The models are small enough that one thread is
faster than two, and on a shared 2-core machine much steadier, so the tests use one.
"""

import argparse
import copy
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bpe  # noqa: E402
import gpt2  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def randomize(model, std=0.3, seed=0):
    """Weights far from GPT-2's gentle init: sharp attention and confident logits,
    so that a wrong mask or a stale cache changes the output clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


# -----------------------------------------------------------------------------
# A small corpus, written here: three "novels" made of Russian sentences.

SENTENCES = [
    "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему.",
    "— Что же вы молчите? — спросила она, не поднимая глаз.",
    "Он долго ходил по комнате, потом сел к окну и стал смотреть на улицу.",
    "Весна в том году была ранняя, и уже в марте в саду зацвели яблони.",
    "— Я не знаю, — ответил он тихо, — право, не знаю.",
    "Мой дядя самых честных правил, когда не в шутку занемог.",
    "За окном шёл снег, и в печке потрескивали сухие берёзовые дрова.",
    "Никто не знал, откуда он приехал и зачем остановился в нашем городе.",
    "Старик снял шапку, перекрестился и медленно пошёл к реке.",
    "— Ну, полно, полно, — сказала бабушка. — Ешь, пока горячее.",
    "Вечером все собрались в гостиной, и разговор зашёл о литературе.",
    "Письмо пришло только через неделю, когда уже было поздно.",
]


def write_novels(folder, n_novels=3, sentences_per_novel=60):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n_novels):
        text = "\n".join(" ".join(rng.sample(SENTENCES, 4)) for _ in range(sentences_per_novel // 4))
        (folder / f"Author{i}_Novel{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_novels(tmp_path_factory.mktemp("corpus"))


TINY = ["--vocab-size", "300", "--block-size", "16", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--batch-size", "4", "--warmup-iters", "2", "--eval-iters", "2", "--device", "cpu"]


def train_args(corpus, out_dir, *more):
    return ["train", "--data", str(corpus), "--out-dir", str(out_dir), *TINY, *more]


def run_main(capsys, *argv):
    """gpt2.main in this process: (exit code, stdout, stderr)."""
    code = gpt2.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "gpt2.py"), *map(str, argv)], capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny model trained for a few steps: out_dir with ckpt.pt and tokenizer.json."""
    out_dir = tmp_path_factory.mktemp("trained")
    assert gpt2.main(train_args(corpus, out_dir, "--max-iters", "6", "--eval-interval", "3")) == 0
    return out_dir


def weights(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["weights"]


# -----------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=8), "n_embd (30) must be divisible by n_head (8)"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(block_size=-1), "block_size must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(dropout=-0.1), "dropout must be in [0, 1)"),
])
def test_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError) as error:
        GPTConfig(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(grad_accum=0), "grad_accum must be a positive integer"),
    (dict(lr=0.0), "lr must be positive"),
    (dict(warmup_iters=-1), "warmup_iters must not be negative"),
    (dict(max_time=0.0), "max_time must be positive"),
])
def test_train_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError) as error:
        gpt2.TrainConfig(**kwargs)
    assert message in str(error.value)


def test_lr_decay_iters_defaults_to_max_iters():
    assert gpt2.TrainConfig(max_iters=123).lr_decay_iters == 123
    assert gpt2.TrainConfig(max_iters=123, lr_decay_iters=500).lr_decay_iters == 500


# -----------------------------------------------------------------------------
# Model: the parts


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    assert torch.allclose(gpt2.gelu(x), F.gelu(x, approximate="tanh"), atol=1e-12, rtol=0)
    # ... and not the exact GELU, which differs by up to ~5e-4.
    assert not torch.allclose(gpt2.gelu(x), F.gelu(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("T, T_k", [(7, 7), (1, 7), (3, 7), (1, 1)])
def test_fused_attention_equals_written_out(T, T_k):
    generator = torch.Generator().manual_seed(T * 10 + T_k)
    q, k, v = (torch.randn(2, 3, n, 8, generator=generator, dtype=torch.float64) for n in (T, T_k, T_k))
    expected = gpt2.attention(q, k, v)
    assert torch.allclose(gpt2.fused_attention(q, k, v), expected, atol=1e-12)
    # The mask matters: the last query sees everything, the first (if T > 1) does not.
    unmasked = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    assert torch.allclose(expected[..., -1, :], unmasked[..., -1, :], atol=1e-12)
    if T_k > 1 and T > 1:
        assert not torch.allclose(expected[..., 0, :], unmasked[..., 0, :], atol=1e-3)


def test_model_with_fused_kernels_equals_written_out(monkeypatch):
    """Logits and gradients, with and without a KV-cache."""
    config = GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16)
    model = randomize(GPT(config).double())
    idx = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        cache = gpt2.KVCache(config, 3, "cpu", torch.float64)
        with torch.no_grad():
            cached = torch.cat([model(idx[:, :5], kv_cache=cache)[0], model(idx[:, 5:9], kv_cache=cache)[0],
                                model(idx[:, 9:10], kv_cache=cache)[0], model(idx[:, 10:], kv_cache=cache)[0]], 1)
        return logits.detach(), cached, [p.grad.clone() for p in model.parameters()]

    fused = run()
    monkeypatch.setattr(gpt2, "FUSED", False)
    written_out = run()
    assert torch.allclose(fused[0], written_out[0], atol=1e-10)
    assert torch.allclose(fused[1], written_out[1], atol=1e-10)
    for g_fused, g_written in zip(fused[2], written_out[2], strict=True):
        assert torch.allclose(g_fused, g_written, atol=1e-10)


def test_weight_names_follow_the_gpt2_checkpoint():
    names = set(GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=2, n_head=1, n_embd=4)).state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.weight",
                 "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias",
                 "transformer.h.1.ln_2.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                 "transformer.ln_f.weight", "lm_head.weight"]:
        assert name in names


# -----------------------------------------------------------------------------
# Model: the whole


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 100, (3, 8))
    logits, loss = model(idx)
    assert logits.shape == (3, 8, 100) and loss is None
    _, loss = model(idx, targets=torch.randint(0, 100, (3, 8)))
    assert abs(loss.item() - math.log(100)) < 0.1  # at init, close to uniform over the vocabulary
    with pytest.raises(ValueError, match="do not fit the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("fused", [True, False])
def test_changing_a_future_token_never_changes_earlier_logits(fused, monkeypatch):
    monkeypatch.setattr(gpt2, "FUSED", fused)
    model = randomize(GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=4, n_embd=32)))
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (2, 16), generator=generator)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 38, (2,), generator=generator)) % 40
        before, after = model(idx)[0], model(changed)[0]
        assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)
        assert not torch.allclose(before[:, t], after[:, t], atol=1e-3)


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(GPTConfig(vocab_size=2000, block_size=256, n_layer=n_layer, n_head=4, n_embd=256))
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() / residual_std - 1) < 0.05, name
        elif p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name
    assert model.lm_head.weight is model.transformer.wte.weight


small_configs = st.builds(
    lambda n_layer, n_head, head_size, block_size, vocab_size: GPTConfig(
        vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_head * head_size),
    n_layer=st.integers(1, 3), n_head=st.integers(1, 4), head_size=st.integers(1, 8),
    block_size=st.integers(1, 12), vocab_size=st.integers(2, 60),
)


@settings(max_examples=30, deadline=None)
@given(config=small_configs, data=st.data())
def test_cached_decoding_gives_the_full_forwards_logits(config, data):
    """Prefill some tokens, then feed the rest in random chunks: float32, within 1e-5."""
    model = randomize(GPT(config), std=0.2, seed=data.draw(st.integers(0, 1000)))
    length = data.draw(st.integers(1, config.block_size))
    batch = data.draw(st.integers(1, 2))
    idx = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, config.vocab_size - 1), min_size=length,
                                                   max_size=length), min_size=batch, max_size=batch)))
    cache = gpt2.KVCache(config, batch, "cpu", torch.float32)
    pieces, done = [], 0
    while done < length:
        chunk = data.draw(st.integers(1, length - done))
        pieces.append(model(idx[:, done : done + chunk], kv_cache=cache)[0])
        done += chunk
    full = model(idx)[0]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(config=small_configs, data=st.data())
def test_greedy_generation_with_cache_equals_without(config, data):
    """In float64, so that no near-tie flips a token; prompts and outputs run past block_size."""
    model = randomize(GPT(config).double(), std=0.3, seed=data.draw(st.integers(0, 1000)))
    prompt_length = data.draw(st.integers(1, 2 * config.block_size))
    new_tokens = data.draw(st.integers(0, 2 * config.block_size + 3))
    prompt = torch.tensor([data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=prompt_length,
                                              max_size=prompt_length))])
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    plain = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (1, prompt_length + new_tokens)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :prompt_length], prompt)


def test_cache_past_the_context_is_exact_where_a_sliding_cache_is_not():
    """Past block_size, greedy generation must follow the cropped-window model:
    each token is the argmax of a full forward over the last block_size tokens."""
    config = GPTConfig(vocab_size=30, block_size=6, n_layer=2, n_head=2, n_embd=16)
    model = randomize(GPT(config).double(), std=0.5, seed=3)
    out = model.generate(torch.tensor([[1, 2, 3]]), 12, temperature=0)
    for t in range(3, 15):
        window = out[:, max(0, t - 6) : t]
        assert out[0, t] == model(window)[0][0, -1].argmax()


def test_decoding_layout_changes_the_memory_order_only():
    """Cached generation stores c_attn, c_fc and the tied head transposed in memory;
    every weight keeps its shape and values, the logits stay, and training goes on as before."""
    config = GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = randomize(GPT(config))
    twin = copy.deepcopy(model)
    before = {name: p.clone() for name, p in model.named_parameters()}
    model.generate(torch.tensor([[1, 2]]), 3, temperature=0)
    transposed = {name for name, p in model.named_parameters() if p.t().is_contiguous() and not p.is_contiguous()}
    assert transposed == {"transformer.wte.weight", *(f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)),
                          *(f"transformer.h.{i}.mlp.c_fc.weight" for i in range(2))}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    storage = [p.data_ptr() for p in model.parameters()]
    model.lay_out_for_decoding()  # a second time: nothing to do, nothing copied
    assert [p.data_ptr() for p in model.parameters()] == storage

    x, y = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    assert torch.allclose(model(x)[0], twin(x)[0], atol=1e-5)
    one_vector = twin(x[:1, :1])[0]  # by nn.Linear's product
    with mock.patch.object(gpt2.Linear, "split_from", 1), mock.patch.object(torch, "get_num_threads", return_value=2):
        assert torch.allclose(model(x[:1, :1])[0], one_vector, atol=1e-5)  # each product in two parts
    for m in (model, twin):
        # SGD: Adam's first step is about lr * sign(gradient), which would blow rounding up.
        optimizer = torch.optim.SGD(m.train().parameters(), lr=0.1)
        m(x, y)[1].backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


@settings(max_examples=40, deadline=None)
@given(in_features=st.integers(1, 40), out_features=st.integers(1, 40), bias=st.booleans(),
       threads=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_one_vector_on_all_threads_is_the_same_product(in_features, out_features, bias, threads, seed):
    """Linear.vector_forward, the weight's rows dealt out to the threads, is x W^T + b
    in both layouts; Linear takes that road exactly when one vector meets a weight
    of at least split_from entries."""
    torch.manual_seed(seed)
    layer = gpt2.Linear(in_features, out_features, bias=bias)
    batch = torch.randn(2, 3, in_features)
    for transposed in (False, True):
        if transposed:
            layer.weight.data = layer.weight.data.t().contiguous().t()  # as GPT.lay_out_for_decoding does
        for x in (torch.randn(in_features), torch.randn(1, 1, in_features)):
            # As many parts as a CPU with `threads` threads gets; the real thread pool stays as it is.
            with mock.patch.object(torch, "get_num_threads", return_value=threads):
                y = layer.vector_forward(x)
                with mock.patch.object(gpt2.Linear, "split_from", in_features * out_features):
                    assert torch.equal(layer(x), y)
                    assert torch.equal(layer(batch), F.linear(batch, layer.weight, layer.bias))  # not one vector
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # a weight below split_from
            assert y.shape == x.shape[:-1] + (out_features,)
            assert torch.allclose(y, F.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_sampling_options():
    torch.manual_seed(0)
    model = randomize(GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8)), std=0.5)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(greedy[:, 3], model(prompt)[0][:, -1].argmax(-1))
    assert torch.equal(model.generate(prompt, 10, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 10, top_p=1e-9), greedy)
    assert model.generate(prompt, 10, top_k=10**6).shape == (2, 13)  # top_k is clamped to the vocabulary
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(prompt, 1, **bad)


def test_top_k_and_top_p_keep_the_right_tokens():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    assert set(gpt2.sample_next(logits, top_p=0.7).flatten().tolist()) == {0, 1}
    assert set(gpt2.sample_next(logits, top_k=3).flatten().tolist()) == {0, 1, 2}
    assert set(gpt2.sample_next(logits).flatten().tolist()) == {0, 1, 2, 3}
    assert set(gpt2.sample_next(logits, temperature=0).flatten().tolist()) == {0}


# -----------------------------------------------------------------------------
# Data


def test_get_batch_gives_shifted_windows_and_splits_across_processes():
    tokens = torch.arange(1000, dtype=torch.int32).to(torch.uint16)
    x, y = gpt2.get_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(16))
    both = [gpt2.get_batch(tokens, 4, 16, torch.Generator().manual_seed(0), rank, 2)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(both), x)  # 2 processes with batch 4 = 1 process with batch 8


@pytest.mark.parametrize("n, batch_size, block_size", [(50, 2, 8), (49, 3, 8), (5, 4, 8), (17, 1, 16)])
def test_sequential_batches_predict_every_token_once(n, batch_size, block_size):
    tokens = torch.arange(n, dtype=torch.int32).to(torch.uint16)
    ys = []
    for x, y in gpt2.sequential_batches(tokens, batch_size, block_size):
        assert x.shape == y.shape and x.size(0) <= batch_size and x.size(1) <= block_size
        assert torch.equal(y, x + 1)
        ys.append(y.flatten())
    assert torch.equal(torch.cat(ys), torch.arange(1, n))


# -----------------------------------------------------------------------------
# Training


def test_lr_schedule():
    cfg = gpt2.TrainConfig(lr=1e-3, warmup_iters=10, max_iters=100)
    lrs = [gpt2.get_lr(step, cfg) for step in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in pairwise(lrs[:10]))  # warmup rises
    assert all(a >= b for a, b in pairwise(lrs[9:101]))  # cosine falls
    assert lrs[55] == pytest.approx(0.55e-3)  # halfway down from 1e-3 to 1e-4
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=2, n_head=1, n_embd=4))
    optimizer = gpt2.configure_optimizer(model, gpt2.TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in not_decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(model.parameters()))


def test_overfits_one_batch():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config)
    cfg = gpt2.TrainConfig(lr=3e-3, weight_decay=0.0)
    optimizer = gpt2.configure_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05  # from ln(64) = 4.16: random targets, learned by heart


def test_evaluate_gives_loss_and_bits_per_character():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8))
    char_counts = torch.randint(0, 4, (20,))
    batches = [(torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8))) for _ in range(3)]
    loss, bpc = gpt2.evaluate(model, batches, char_counts, torch.device("cpu"))
    nats = sum(F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum") for x, y in batches)
    chars = sum(char_counts[y].sum() for _, y in batches)
    assert loss == pytest.approx(nats.item() / 48)
    assert bpc == pytest.approx(nats.item() / math.log(2) / chars.item())


def test_parse_duration():
    assert gpt2.parse_duration("90s") == 90 and gpt2.parse_duration("30m") == 1800
    assert gpt2.parse_duration("1.5h") == 5400 and gpt2.parse_duration("45") == 45
    for bad in ("soon", "0m", "-5s", "1d"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpt2.parse_duration(bad)


def test_resume_continues_exactly(corpus, tmp_path, capsys):
    """8 steps straight == 4 steps, then --resume for 4 more: the same weights and
    optimizer state, bit for bit (with dropout and gradient accumulation on)."""
    common = ["--lr-decay-iters", "8", "--eval-interval", "3", "--dropout", "0.1", "--grad-accum", "2"]
    assert run_main(capsys, *train_args(corpus, tmp_path / "straight", *common, "--max-iters", "8"))[0] == 0
    assert run_main(capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", "4"))[0] == 0
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 4
    code, out, _ = run_main(capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", "8", "--resume"))
    assert code == 0 and "resuming" in out and "at step 4" in out
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert straight["step"] == split["step"] == 8
    for name, w in straight["weights"].items():
        assert torch.equal(w, split["weights"][name]), name
    for a, b in zip(straight["optimizer"]["state"].values(), split["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert (tmp_path / "split" / "log.csv").read_text().count("\n") == 1 + 4  # header; evals at 3, 4, 6, 8


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(corpus, tmp_path, capsys):
    out_dir = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(ROOT / "gpt2.py"), *train_args(corpus, out_dir),
                                "--max-iters", "100000", "--lr-decay-iters", "100000", "--log-interval", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "interrupted at step" in out and "Traceback" not in err
    step = torch.load(out_dir / "ckpt.pt", weights_only=True)["step"]
    assert step >= 3

    more = ["--max-iters", str(step + 2), "--lr-decay-iters", "100000"]
    assert run_main(capsys, *train_args(corpus, out_dir, *more, "--resume"))[0] == 0
    assert run_main(capsys, *train_args(corpus, tmp_path / "straight", *more))[0] == 0
    resumed, straight = weights(out_dir), weights(tmp_path / "straight")
    assert all(torch.equal(w, resumed[name]) for name, w in straight.items())


def test_max_time_stops_cleanly(corpus, tmp_path, capsys):
    code, out, _ = run_main(capsys, *train_args(corpus, tmp_path, "--max-iters", "100000", "--max-time", "1s"))
    assert code == 0 and "stopped by --max-time" in out and "eval step" in out
    assert 0 < torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] < 100000


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import gpt2
model = gpt2.train(gpt2.GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32),
                   gpt2.TrainConfig(data_dir={data!r}, out_dir={out!r}, batch_size=2, max_iters=4,
                                    warmup_iters=2, eval_interval=2, eval_iters=2, device="cpu",
                                    dtype="float32"))
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_two_processes_on_gloo_train_like_one_with_the_double_batch(corpus, tmp_path, capsys):
    out_dir = tmp_path / "ddp"
    out_dir.mkdir()
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), data=str(corpus), out=str(out_dir)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(out_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(out_dir / "rank1.pt", weights_only=True)
    assert all(torch.equal(w, rank1[name]) for name, w in rank0.items())

    single = ["--max-iters", "4", "--warmup-iters", "2", "--eval-interval", "2", "--batch-size", "4",
              "--dtype", "float32"]
    assert run_main(capsys, *train_args(corpus, tmp_path / "single", *single))[0] == 0
    one_process = weights(tmp_path / "single")
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["step"] == 4
    for name, w in one_process.items():
        assert torch.allclose(w, rank0[name], atol=2e-5), name


# -----------------------------------------------------------------------------
# Command line


def test_cli_train_sample_eval(corpus, tmp_path):
    out_dir = tmp_path / "run"
    result = run_cli(*train_args(corpus, out_dir, "--max-iters", "4", "--eval-interval", "2"))
    assert result.returncode == 0, result.stderr
    assert "eval step 4" in result.stdout and "bpc" in result.stdout and "ETA" in result.stdout
    assert {"tokenizer.json", "train.bin", "val.bin", "ckpt.pt", "log.csv"} <= {p.name for p in out_dir.iterdir()}
    assert (out_dir / "log.csv").read_text().startswith("step,lr,train_loss,train_bpc,val_loss,val_bpc")

    result = run_cli("sample", "--out-dir", out_dir, "--prompt", "Мой дядя", "--max-new-tokens", "20",
                     "--num-samples", "2", "--top-k", "100000", "--top-p", "0.9", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Мой дядя") and result.stdout.count("Мой дядя") == 2
    assert "tokens/s" in result.stderr

    result = run_cli("eval", "--out-dir", out_dir, "--data", corpus, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "validation split" in result.stdout and "bits per character" in result.stdout

    text = tmp_path / "text.txt"
    text.write_text(SENTENCES[0] + "\n" + SENTENCES[1] + "\n", encoding="utf-8")
    result = run_cli("eval", "--out-dir", out_dir, "--text", text, "--device", "cpu")
    assert result.returncode == 0 and "bits per character" in result.stdout


def test_sample_without_prompt_and_without_cache(trained, capsys):
    code, out, err = run_main(capsys, "sample", "--out-dir", trained, "--max-new-tokens", "30", "--temperature", "0",
                              "--ignore-eot", "--device", "cpu")
    code_no_cache, out_no_cache, _ = run_main(capsys, "sample", "--out-dir", trained, "--max-new-tokens", "30",
                                              "--temperature", "0", "--ignore-eot", "--no-cache", "--device", "cpu")
    assert code == code_no_cache == 0 and out == out_no_cache and out.strip()
    assert "30 tokens in" in err


def test_eval_of_a_text_matches_the_tokens_it_scores(trained, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(SENTENCES), encoding="utf-8")
    code, out, _ = run_main(capsys, "eval", "--out-dir", trained, "--text", text, "--device", "cpu")
    n_tokens = len(bpe.Tokenizer.load(trained / "tokenizer.json").encode(" ".join(SENTENCES)))
    assert code == 0 and f"({n_tokens:,} tokens)" in out


def test_help_lists_every_flag_with_its_default(capsys):
    commands = gpt2.build_parser()._subparsers._group_actions[0].choices
    for command, parser in commands.items():
        with pytest.raises(SystemExit):
            gpt2.main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        for action in parser._actions:
            if action.dest == "help":
                continue
            flag_help = " ".join(parser._get_formatter()._get_help_string(action).split())
            assert action.option_strings[0] in help_text and "default: " in flag_help
            assert flag_help % {"default": action.default} in help_text


def copy_run(trained, tmp_path):
    out_dir = tmp_path / "copy"
    shutil.copytree(trained, out_dir)
    return out_dir


def other_model_checkpoint(out_dir):
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    torch.save({**checkpoint, "model": "llama"}, out_dir / "ckpt.pt")


def other_tokenizer(out_dir):
    bpe.Tokenizer.train([" ".join(SENTENCES[:3])], 280).save(out_dir / "tokenizer.json")


def garbage_checkpoint(out_dir):
    (out_dir / "ckpt.pt").write_bytes(b"not a checkpoint at all")


def truncated_checkpoint(out_dir):
    data = (out_dir / "ckpt.pt").read_bytes()
    (out_dir / "ckpt.pt").write_bytes(data[: len(data) // 2])


def shape_mismatch_checkpoint(out_dir):
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "n_embd": 64}}, out_dir / "ckpt.pt")


@pytest.mark.parametrize("spoil, argv, message", [
    (None, ["train", "--data", "{tmp}/nowhere", "--out-dir", "{run}"], "no corpus at"),
    (None, ["sample", "--out-dir", "{tmp}/empty"], "no checkpoint at"),
    (None, ["eval", "--out-dir", "{tmp}/empty"], "no checkpoint at"),
    (other_model_checkpoint, ["sample", "--out-dir", "{run}"], "checkpoint of 'llama', not of 'gpt2'"),
    (other_tokenizer, ["sample", "--out-dir", "{run}"], "another tokenizer"),
    (other_tokenizer, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY, "--resume"], "another tokenizer"),
    (garbage_checkpoint, ["sample", "--out-dir", "{run}"], "corrupt or not a checkpoint"),
    (truncated_checkpoint, ["eval", "--out-dir", "{run}"], "corrupt or not a checkpoint"),
    (shape_mismatch_checkpoint, ["sample", "--out-dir", "{run}"], "weights do not fit its config"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--n-embd", "30"], "must be divisible"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--dropout", "1"], "dropout must be"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--batch-size", "0"], "batch_size must be"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--max-time", "soon"], "invalid duration"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--device", "tpu"], "unknown device"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--block-size", "100000"], "fewer than"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--resume"], "no checkpoint at"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY, "--n-layer", "3", "--resume"],
     "another model shape: n_layer=2 (asked: 3)"),
    (None, ["sample", "--out-dir", "{run}", "--temperature", "-1"], "temperature must be"),
    (None, ["sample", "--out-dir", "{run}", "--top-p", "0"], "top_p must be"),
    (None, ["sample", "--out-dir", "{run}", "--top-k", "0"], "top_k must be"),
    (None, ["sample", "--out-dir", "{run}", "--prompt-file", "{tmp}/none.txt"], "no such file"),
    (None, ["eval", "--out-dir", "{run}", "--text", "{tmp}/none.txt"], "no such file"),
    (None, ["sample", "--out-dir", "{run}", "--prompt", "a", "--prompt-file", "b"], "not allowed with"),
])
def test_bad_input_gives_one_line_and_exit_1(spoil, argv, message, trained, corpus, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    if spoil:
        spoil(run)
    argv = [a.format(tmp=tmp_path, run=run, corpus=corpus) for a in argv]
    try:
        code = gpt2.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv", [["eval", "--out-dir", "{tmp}"],
                                  ["train", "--data", "{tmp}/nowhere", "--out-dir", "{tmp}"]])
def test_bad_input_from_the_shell_has_no_traceback(argv, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)  # corrupt
    result = run_cli(*[a.format(tmp=tmp_path) for a in argv])
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
