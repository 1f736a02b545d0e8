"""Tests for llama.py: RMSNorm, RoPE, SwiGLU and grouped-query attention, the
KV-cache, Hugging Face's LlamaForCausalLM as the reference (loaded with
--init-from), training and resume, and the command line end to end.

Everything runs on tiny models and on a few small Russian texts written here;
nothing needs the real corpus. What llama.py shares with gpt2.py unchanged (the
data, the optimizer, the schedule, torchrun, Ctrl-C) is tested in test_gpt2.py.
"""

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
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
import llama  # noqa: E402
from llama import Llama, LlamaConfig  # noqa: E402

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def randomize(model, std=0.3, seed=0):
    """Weights far from the gentle init: sharp attention and confident logits,
    so that a wrong mask, rotation or stale cache changes the output clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def tiny(**kwargs):
    return LlamaConfig(**{**dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=16, n_kv_head=2,
                                 multiple_of=8), **kwargs})


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
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(3):
        text = "\n".join(" ".join(rng.sample(SENTENCES, 4)) for _ in range(15))
        (folder / f"Author{i}_Novel{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


TINY = ["--vocab-size", "300", "--block-size", "16", "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2",
        "--n-embd", "32", "--batch-size", "4", "--warmup-iters", "2", "--eval-iters", "2", "--device", "cpu"]


def train_args(corpus, out_dir, *more):
    return ["train", "--data", str(corpus), "--out-dir", str(out_dir), *TINY, *more]


def run_main(capsys, *argv):
    """llama.main in this process: (exit code, stdout, stderr)."""
    code = llama.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "llama.py"), *map(str, argv)], capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny model trained for a few steps: out_dir with ckpt.pt and tokenizer.json."""
    out_dir = tmp_path_factory.mktemp("trained")
    assert llama.main(train_args(corpus, out_dir, "--max-iters", "4", "--eval-interval", "2")) == 0
    return out_dir


# -----------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=8), "n_embd (30) must be divisible by n_head (8)"),
    (dict(n_embd=24, n_head=8), "head size n_embd // n_head (3) must be even"),
    (dict(n_head=8, n_kv_head=3), "n_head (8) must be divisible by n_kv_head (3)"),
    (dict(n_kv_head=0), "n_kv_head must be a positive integer"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(multiple_of=0), "multiple_of must be a positive integer"),
    (dict(mlp_hidden=-5), "mlp_hidden must be a positive integer"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(norm_eps=0.0), "norm_eps must be positive"),
    (dict(rope_theta=1.0), "rope_theta must be greater than 1"),
])
def test_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError) as error:
        LlamaConfig(**kwargs)
    assert message in str(error.value)


def test_mlp_hidden_is_two_thirds_of_4_n_embd_rounded_up():
    assert LlamaConfig(n_embd=4096, n_head=32, multiple_of=256).mlp_hidden == 11008  # LLaMA-7B
    assert LlamaConfig(n_embd=256, multiple_of=64).mlp_hidden == 704
    assert LlamaConfig(n_embd=256, mlp_hidden=100).mlp_hidden == 100


# -----------------------------------------------------------------------------
# Model: the parts


def test_rmsnorm_divides_by_the_root_mean_square_only():
    norm = llama.RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6, dtype=torch.float64) * 5 + 3
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0)
    assert torch.allclose(norm(x.float()).double(), expected, atol=1e-5)
    assert not torch.allclose(norm(x.float()), norm(x.float() + 1.0), atol=1e-3)  # no mean subtraction
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # no bias


def test_silu_and_fused_attention_equal_written_out():
    x = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    assert torch.allclose(llama.silu(x), F.silu(x), atol=1e-12)
    generator = torch.Generator().manual_seed(0)
    for T, T_k in [(7, 7), (1, 7), (3, 7)]:
        q, k, v = (torch.randn(2, 3, n, 8, generator=generator, dtype=torch.float64) for n in (T, T_k, T_k))
        assert torch.allclose(llama.fused_attention(q, k, v), llama.attention(q, k, v), atol=1e-12)


def rope_at(config, x, start):
    rope = llama.RotaryEmbedding(config).double()
    return llama.apply_rope(x, *rope(start, x.size(-2)))


@settings(max_examples=20, deadline=None)
@given(half=st.integers(1, 8), m=st.integers(0, 40), n=st.integers(0, 40), shift=st.integers(0, 40),
       theta=st.sampled_from([100.0, 10000.0, 500000.0]), seed=st.integers(0, 1000))
def test_rope_scores_depend_only_on_relative_position(half, m, n, shift, theta, seed):
    """q at position m and k at position n score as q at m + shift and k at n + shift."""
    config = LlamaConfig(n_embd=2 * half, n_head=1, n_kv_head=1, block_size=100, rope_theta=theta)
    generator = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 1, 2 * half, generator=generator, dtype=torch.float64)

    def score(i, j):
        return (rope_at(config, q, i) * rope_at(config, k, j)).sum().item()

    # The angles are stored in float32: equal to float32's precision.
    assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-5, abs=1e-5)
    assert rope_at(config, q, m).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)  # a rotation


def test_rope_is_metas_interleaved_rotation_up_to_a_permutation():
    """Meta's code rotates neighbouring features (2i, 2i+1) as complex numbers; we
    rotate (i, i + head_size/2). Listing the evens first, then the odds, turns one
    into the other: the permutation Hugging Face applies to q_proj and k_proj rows."""
    head_size, T = 8, 10
    config = LlamaConfig(n_embd=head_size, n_head=1, n_kv_head=1, block_size=T, rope_theta=10000.0)
    x = torch.randn(1, 1, T, head_size, dtype=torch.float64)
    inv_freq = 10000.0 ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, head_size / 2)
    pairs = torch.view_as_complex(x.reshape(1, 1, T, head_size // 2, 2).contiguous())
    meta = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    evens_then_odds = torch.cat([torch.arange(0, head_size, 2), torch.arange(1, head_size, 2)])
    ours = rope_at(config, x[..., evens_then_odds], 0)
    assert torch.allclose(ours, meta[..., evens_then_odds], atol=1e-6)


def test_weights_have_no_biases_and_hugging_faces_names():
    model = Llama(tiny())
    names = set(model.state_dict())
    for name in ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                 "model.norm.weight", "lm_head.weight"]:
        assert name in names
    assert not any("bias" in name for name in names)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 4, 16)  # n_kv_head * head_size


def test_model_with_fused_kernels_equals_written_out(monkeypatch):
    """Logits and gradients, with and without a KV-cache, with grouped queries."""
    config = tiny()
    model = randomize(Llama(config).double())
    idx = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        cache = llama.KVCache(config, 3, "cpu", torch.float64)
        with torch.no_grad():
            cached = torch.cat([model(idx[:, :5], kv_cache=cache)[0], model(idx[:, 5:9], kv_cache=cache)[0],
                                model(idx[:, 9:10], kv_cache=cache)[0], model(idx[:, 10:], kv_cache=cache)[0]], 1)
        return logits.detach(), cached, [p.grad.clone() for p in model.parameters()]

    fused = run()
    monkeypatch.setattr(llama, "FUSED", False)
    written_out = run()
    assert torch.allclose(fused[0], written_out[0], atol=1e-10)
    assert torch.allclose(fused[1], written_out[1], atol=1e-10)
    for g_fused, g_written in zip(fused[2], written_out[2], strict=True):
        assert torch.allclose(g_fused, g_written, atol=1e-10)


def test_grouped_query_attention_is_multi_head_with_shared_keys_and_values():
    """n_kv_head < n_head gives what multi-head attention gives when each group of
    query heads has copies of its key/value head."""
    gqa = randomize(Llama(tiny(n_kv_head=2)).double())
    mha = Llama(tiny(n_kv_head=4)).double().eval()
    weights = dict(gqa.state_dict())
    for name in list(weights):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (2 heads * 4, 16) -> (4 heads * 4, 16)
            weights[name] = weights[name].view(2, 4, 16).repeat_interleave(2, dim=0).reshape(16, 16)
    mha.load_state_dict(weights)
    idx = torch.randint(0, 40, (2, 12))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-10)
    cache = llama.KVCache(gqa.config, 2, "cpu", torch.float64)
    assert len(cache.k) == 2 and cache.k[0].shape == (2, 2, 12, 4)  # n_layer x (B, n_kv_head, block_size, head_size)


# -----------------------------------------------------------------------------
# Model: the whole


def test_forward_shapes_initial_loss_and_initialisation():
    torch.manual_seed(0)
    n_layer = 8
    model = Llama(LlamaConfig(vocab_size=2000, block_size=64, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=256))
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() / residual_std - 1) < 0.05, name
        elif p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
        else:
            assert torch.all(p == 1), name  # RMSNorm gains
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied by default
    tied = Llama(tiny(tie_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.num_params() == Llama(tiny()).num_params() - 40 * 16

    logits, loss = model(torch.randint(0, 2000, (3, 8)), targets=torch.randint(0, 2000, (3, 8)))
    assert logits.shape == (3, 8, 2000)
    assert abs(loss.item() - math.log(2000)) < 0.1  # at init, close to uniform over the vocabulary
    with pytest.raises(ValueError, match="do not fit the context"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("fused", [True, False])
def test_changing_a_future_token_never_changes_earlier_logits(fused, monkeypatch):
    monkeypatch.setattr(llama, "FUSED", fused)
    model = randomize(Llama(LlamaConfig(vocab_size=40, block_size=16, n_layer=3, n_head=4, n_kv_head=1, n_embd=32)))
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (2, 16), generator=generator)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 38, (2,), generator=generator)) % 40
        before, after = model(idx)[0], model(changed)[0]
        assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)
        assert not torch.allclose(before[:, t], after[:, t], atol=1e-3)


small_configs = st.builds(
    lambda n_layer, n_kv_head, group, half_head, block_size, vocab_size: LlamaConfig(
        vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_kv_head * group,
        n_kv_head=n_kv_head, n_embd=n_kv_head * group * 2 * half_head, multiple_of=4),
    n_layer=st.integers(1, 3), n_kv_head=st.integers(1, 2), group=st.integers(1, 3), half_head=st.integers(1, 4),
    block_size=st.integers(1, 12), vocab_size=st.integers(2, 60),
)


@settings(max_examples=30, deadline=None)
@given(config=small_configs, data=st.data())
def test_cached_decoding_gives_the_full_forwards_logits(config, data):
    """Prefill some tokens, then feed the rest in random chunks: float32, within 1e-5."""
    model = randomize(Llama(config), std=0.2, seed=data.draw(st.integers(0, 1000)))
    length = data.draw(st.integers(1, config.block_size))
    batch = data.draw(st.integers(1, 2))
    idx = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, config.vocab_size - 1), min_size=length,
                                                   max_size=length), min_size=batch, max_size=batch)))
    cache = llama.KVCache(config, batch, "cpu", torch.float32)
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
    model = randomize(Llama(config).double(), std=0.3, seed=data.draw(st.integers(0, 1000)))
    prompt_length = data.draw(st.integers(1, 2 * config.block_size))
    new_tokens = data.draw(st.integers(0, 2 * config.block_size + 3))
    prompt = torch.tensor([data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=prompt_length,
                                              max_size=prompt_length))])
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    plain = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (1, prompt_length + new_tokens)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :prompt_length], prompt)


def test_decoding_layout_changes_the_memory_order_only():
    """Cached generation stores gate_proj, up_proj and the head transposed in memory;
    every weight keeps its shape and values, the logits stay, and training goes on as before."""
    model = randomize(Llama(tiny()))  # n_embd 16: q_proj and o_proj square, k_proj and v_proj narrower
    twin = copy.deepcopy(model)
    before = {name: p.clone() for name, p in model.named_parameters()}
    model.generate(torch.tensor([[1, 2]]), 3, temperature=0)
    transposed = {name for name, p in model.named_parameters() if p.t().is_contiguous() and not p.is_contiguous()}
    assert transposed == {"lm_head.weight", *(f"model.layers.{i}.mlp.{proj}.weight"
                                              for i in range(2) for proj in ("gate_proj", "up_proj"))}
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())

    x, y = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    assert torch.allclose(model(x)[0], twin(x)[0], atol=1e-5)
    one_vector = twin(x[:1, :1])[0]  # by nn.Linear's product
    with mock.patch.object(llama.Linear, "split_from", 1), mock.patch.object(torch, "get_num_threads", return_value=2):
        assert torch.allclose(model(x[:1, :1])[0], one_vector, atol=1e-5)  # each product in two parts
    for m in (model, twin):
        # SGD: Adam's first step is about lr * sign(gradient), which would blow rounding up.
        optimizer = torch.optim.SGD(m.train().parameters(), lr=0.1)
        m(x, y)[1].backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_cache_past_the_context_is_exact():
    """Past block_size, greedy generation follows the cropped-window model: each
    token is the argmax of a full forward over the last block_size tokens."""
    config = tiny(block_size=6)
    model = randomize(Llama(config).double(), std=0.5, seed=3)
    out = model.generate(torch.tensor([[1, 2, 3]]), 12, temperature=0)
    for t in range(3, 15):
        assert out[0, t] == model(out[:, max(0, t - 6) : t])[0][0, -1].argmax()


# -----------------------------------------------------------------------------
# Against the reference: Hugging Face's LlamaForCausalLM


def hf_llama(folder, seed=0, dtype=None, **kwargs):
    """A random small transformers LlamaForCausalLM (weights far from its init),
    saved in folder with save_pretrained; returns the model."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()  # its progress bars would go to the stderr tests read
    torch.manual_seed(seed)
    settings = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6, rope_theta=500.0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **kwargs})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kwargs", [dict(num_key_value_heads=4), dict(num_key_value_heads=2),
                                    dict(num_key_value_heads=1), dict(tie_word_embeddings=True, rope_theta=10000.0)])
def test_logits_equal_transformers_llama(kwargs, tmp_path):
    reference = hf_llama(tmp_path, **kwargs)
    ours = Llama.from_pretrained(tmp_path).eval()
    assert ours.config.n_kv_head == reference.config.num_key_value_heads
    assert ours.config.tie_embeddings == bool(kwargs.get("tie_word_embeddings"))
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
    assert torch.allclose(ours(idx)[0], expected, atol=1e-4, rtol=0)
    assert set(ours.state_dict()) == set(reference.state_dict())


def test_generation_equals_transformers_generate(tmp_path):
    reference = hf_llama(tmp_path, num_key_value_heads=1).double()
    ours = Llama.from_pretrained(tmp_path).double().eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = reference.generate(prompt, max_new_tokens=11, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt, 11, temperature=0), expected)


def test_reads_bf16_safetensors_and_pytorch_model_bin(tmp_path):
    reference = hf_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    ours = Llama.from_pretrained(tmp_path / "bf16")
    for name, w in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], w.float()), name
    folder = tmp_path / "bin"
    reference = hf_llama(folder)
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    ours = Llama.from_pretrained(folder)
    assert all(torch.equal(ours.state_dict()[name], w) for name, w in reference.state_dict().items())


# -----------------------------------------------------------------------------
# Training


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    optimizer = llama.configure_optimizer(model, llama.TrainConfig(lr=3e-3, weight_decay=0.0), torch.device("cpu"))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05  # from ln(64) = 4.16: random targets, learned by heart


def test_resume_continues_exactly(corpus, tmp_path, capsys):
    """6 steps straight == 3 steps, then --resume for 3 more: the same weights and
    optimizer state, bit for bit (with dropout and gradient accumulation on)."""
    common = ["--lr-decay-iters", "6", "--eval-interval", "3", "--dropout", "0.1", "--grad-accum", "2"]
    assert run_main(capsys, *train_args(corpus, tmp_path / "straight", *common, "--max-iters", "6"))[0] == 0
    assert run_main(capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", "3"))[0] == 0
    code, out, _ = run_main(capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", "6", "--resume"))
    assert code == 0 and "resuming" in out and "at step 3" in out
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert straight["step"] == split["step"] == 6 and straight["model"] == "llama"
    for name, w in straight["weights"].items():
        assert torch.equal(w, split["weights"][name]), name
    for a, b in zip(straight["optimizer"]["state"].values(), split["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


# -----------------------------------------------------------------------------
# Command line


def test_cli_train_sample_eval(corpus, tmp_path):
    out_dir = tmp_path / "run"
    result = run_cli(*train_args(corpus, out_dir, "--max-iters", "4", "--eval-interval", "2", "--tie-embeddings"))
    assert result.returncode == 0, result.stderr
    assert "eval step 4" in result.stdout and "bpc" in result.stdout and "llama:" in result.stdout
    assert {"tokenizer.json", "train.bin", "val.bin", "ckpt.pt", "log.csv"} <= {p.name for p in out_dir.iterdir()}
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["config"]["tie_embeddings"] is True

    result = run_cli("sample", "--out-dir", out_dir, "--prompt", "Мой дядя", "--max-new-tokens", "20",
                     "--num-samples", "2", "--top-k", "100000", "--top-p", "0.9", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Мой дядя") and result.stdout.count("Мой дядя") == 2
    assert "tokens/s" in result.stderr

    result = run_cli("eval", "--out-dir", out_dir, "--data", corpus, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "validation split" in result.stdout and "bits per character" in result.stdout


def test_sample_without_cache_is_the_same(trained, capsys):
    argv = ["sample", "--out-dir", trained, "--max-new-tokens", "30", "--temperature", "0", "--ignore-eot",
            "--device", "cpu"]
    code, out, err = run_main(capsys, *argv)
    code_no_cache, out_no_cache, _ = run_main(capsys, *argv, "--no-cache")
    assert code == code_no_cache == 0 and out == out_no_cache and out.strip()
    assert "30 tokens in" in err


def test_init_from_samples_ids_and_scores_with_a_tokenizer(trained, corpus, tmp_path, capsys):
    tokenizer = trained / "tokenizer.json"
    vocab_size = bpe.Tokenizer.load(tokenizer).vocab_size  # a model that knows the ids of our tokenizer
    reference = hf_llama(tmp_path / "hf", vocab_size=vocab_size)
    code, out, _ = run_main(capsys, "sample", "--init-from", tmp_path / "hf", "--prompt-ids", 3, 1, 4,
                            "--max-new-tokens", 10, "--temperature", 0, "--device", "cpu")
    expected = Llama.from_pretrained(tmp_path / "hf").eval().generate(torch.tensor([[3, 1, 4]]), 10, temperature=0)
    assert code == 0 and out.split() == [str(id) for id in expected[0].tolist()]

    code, out, _ = run_main(capsys, "sample", "--init-from", tmp_path / "hf", "--tokenizer", tokenizer,
                            "--prompt", "Мой дядя", "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0 and out.startswith("Мой дядя")
    code, out, _ = run_main(capsys, "eval", "--init-from", tmp_path / "hf", "--tokenizer", tokenizer,
                            "--data", corpus, "--device", "cpu")
    assert code == 0 and "validation split" in out and "bits per character" in out

    out_dir = tmp_path / "finetuned"  # train --init-from: its shape and weights, then our steps
    out_dir.mkdir()
    shutil.copy(tokenizer, out_dir / "tokenizer.json")
    code, out, err = run_main(capsys, *train_args(corpus, out_dir, "--init-from", tmp_path / "hf", "--max-iters", 1,
                                                  "--lr", "1e-9"))
    assert code == 0, err
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["config"]["vocab_size"] == vocab_size and checkpoint["config"]["rope_theta"] == 500.0
    assert torch.allclose(checkpoint["weights"]["lm_head.weight"], reference.lm_head.weight, atol=1e-6)


def test_help_lists_every_flag_with_its_default(capsys):
    commands = llama.build_parser()._subparsers._group_actions[0].choices
    for command, parser in commands.items():
        with pytest.raises(SystemExit):
            llama.main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
        for action in parser._actions:
            if action.dest == "help":
                continue
            flag_help = " ".join(parser._get_formatter()._get_help_string(action).split())
            assert action.option_strings[0] in help_text and "default: " in flag_help
            assert (flag_help % {"default": action.default}).replace("- ", "-") in help_text


def gpt2_checkpoint(run, corpus):
    """A real gpt2.py checkpoint, trained for one step, in place of llama's."""
    shutil.rmtree(run)
    assert gpt2.main(["train", "--data", str(corpus), "--out-dir", str(run), "--vocab-size", "300",
                      "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "2",
                      "--max-iters", "1", "--eval-iters", "1", "--device", "cpu"]) == 0


def hf_into_run(run, corpus):
    hf_llama(run / "hf")


def hf_folder(tmp_path, spoil):
    folder = tmp_path / "hf"
    hf_llama(folder)
    spoil(folder)
    return folder


def edit_config(**changes):
    def spoil(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return spoil


def no_weights(folder):
    (folder / "model.safetensors").unlink()


def truncated_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def garbage_config(folder):
    (folder / "config.json").write_text("{not json")


@pytest.mark.parametrize("spoil, message", [
    (edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "llama.py loads LlamaForCausalLM only"),
    (edit_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling"),
    (edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "RoPE scaling"),
    (edit_config(attention_bias=True), "has no biases"),
    (edit_config(num_key_value_heads=3), "must be divisible by n_kv_head"),
    (edit_config(intermediate_size=48), "do not belong together"),
    (edit_config(num_hidden_layers=3), "lacks model.layers.2"),
    (garbage_config, "is not valid JSON"),
    (no_weights, "has no model.safetensors or pytorch_model.bin"),
    (truncated_weights, "is corrupt: it is not a safetensors file"),
])
def test_a_bad_init_from_folder_gives_one_line(spoil, message, tmp_path, capsys):
    folder = hf_folder(tmp_path, spoil)
    code, _, err = run_main(capsys, "sample", "--init-from", folder, "--prompt-ids", "1", "--device", "cpu")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("spoil, argv, message", [
    (None, ["sample", "--out-dir", "{tmp}/empty"], "no checkpoint at"),
    (gpt2_checkpoint, ["sample", "--out-dir", "{run}"], "checkpoint of 'gpt2', not of 'llama'"),
    (gpt2_checkpoint, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY, "--resume"],
     "checkpoint of 'gpt2', not of 'llama'"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--n-kv-head", "3"], "divisible by n_kv_head"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY, "--n-kv-head", "4", "--resume"],
     "another model shape: n_kv_head=2 (asked: 4)"),
    (None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--init-from", "{tmp}/nowhere"],
     "no config.json in"),
    (hf_into_run, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--init-from", "{run}/hf"],
     "train --init-from needs the bpe.py tokenizer"),
    (hf_into_run, ["eval", "--init-from", "{run}/hf"], "eval --init-from needs --tokenizer"),
    (None, ["sample", "--init-from", "{tmp}", "--prompt-ids", "1"], "no config.json in"),
    (None, ["sample", "--out-dir", "{run}", "--tokenizer", "{run}/tokenizer.json"], "--tokenizer goes with"),
    (None, ["sample", "--out-dir", "{run}", "--prompt-ids", "100000"], "--prompt-ids must be between 0 and"),
    (None, ["sample", "--out-dir", "{run}", "--prompt", "a", "--prompt-ids", "1"], "not allowed with"),
])
def test_bad_input_gives_one_line_and_exit_1(spoil, argv, message, trained, corpus, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    if spoil:
        spoil(run, corpus)
    argv = [a.format(tmp=tmp_path, run=run, corpus=corpus) for a in argv]
    try:
        code = llama.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_init_from_without_a_tokenizer_needs_ids(tmp_path, capsys):
    hf_llama(tmp_path)
    code, _, err = run_main(capsys, "sample", "--init-from", tmp_path, "--prompt", "текст")
    assert code == 1 and "--prompt-ids" in err and err.count("\n") == 1


def test_bad_init_from_from_the_shell_has_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    result = run_cli("sample", "--init-from", tmp_path, "--prompt-ids", "1")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "lacks 'num_attention_heads'" in result.stderr and "Traceback" not in result.stderr
