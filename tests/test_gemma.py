"""What only gemma.py has: the embedding scale, RMSNorm's (1 + w), GeGLU, a head
size apart from the width, multi-query attention by default, the tied head, and
Hugging Face's GemmaForCausalLM as the reference (loaded with --init-from).
What every model file must do is tested in test_models.py."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, run_main, train_args
from hypothesis import given, settings
from hypothesis import strategies as st
from test_llama import assert_greedy_ids_equal_generate, assert_init_from_refuses, edit_config

import bpe
import gemma
import llama
from gemma import Gemma, GemmaConfig


def tiny(**kwargs):
    """n_head * head_size (24) is not n_embd (16)."""
    return GemmaConfig(**{**dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=16, head_size=6,
                                 multiple_of=8), **kwargs})


# Heads that a config with a head size of its own refuses (gemma.py, qwen3.py), and the word it names.
IMPOSSIBLE_HEADS = [
    (dict(n_embd=24, n_head=8), "even"),  # head_size n_embd // n_head = 3
    (dict(head_size=5), "even"),
    (dict(head_size=0), "head_size"),
    (dict(n_embd=30, n_head=8), "n_embd"),  # no head_size: the width split among the heads
    (dict(n_head=8, n_kv_head=3), "n_kv_head"),
]


@pytest.mark.parametrize("kwargs, key", IMPOSSIBLE_HEADS)
def test_config_rejects_impossible_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GemmaConfig(**kwargs)


def test_config_defaults_multi_query_and_the_head_size():
    config = GemmaConfig()
    assert config.n_kv_head == 1 and config.head_size == config.n_embd // config.n_head
    assert GemmaConfig(n_embd=30, n_head=8, head_size=4).head_size == 4  # n_embd need not divide


def test_rmsnorm_at_init_is_plain_rms_normalisation_and_scales_by_one_plus_w():
    norm = gemma.RMSNorm(6, eps=1e-6)
    assert torch.equal(norm.weight, torch.zeros(6))
    x = torch.randn(2, 3, 6, dtype=torch.float64) * 5 + 3
    plain = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(norm(x.float()).double(), plain, atol=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 2.0, 6))
    assert torch.allclose(norm(x.float()).double(), plain * (1 + torch.linspace(-0.5, 2.0, 6).double()), atol=1e-5)


def test_rmsnorm_casts_back_after_the_scale():
    """In bfloat16, (x̂ * (1 + w)) is rounded once, at the end; LLaMA's order, x̂ rounded, then scaled, differs."""
    norm = gemma.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x32 = x.float()
    normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), (normalised * (1 + norm.weight)).to(torch.bfloat16))
    assert not torch.equal(norm(x), (normalised.to(torch.bfloat16) * (1 + norm.weight)).to(torch.bfloat16))


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    assert torch.allclose(gemma.gelu(x), F.gelu(x, approximate="tanh"), atol=1e-12)
    assert not torch.allclose(gemma.gelu(x), F.gelu(x), atol=1e-5)  # not the exact, erf one
    assert not torch.allclose(gemma.gelu(x), llama.silu(x), atol=1e-3)


def first_block_input(model, idx):
    """What the embedding hands the first block."""
    seen = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(idx)
    handle.remove()
    return seen[0]


def test_embeddings_are_scaled_by_sqrt_n_embd_in_their_dtype():
    model = Gemma(tiny(n_embd=36, n_head=2, head_size=4)).eval()
    idx = torch.randint(0, 40, (2, 12))
    assert torch.allclose(first_block_input(model, idx), model.model.embed_tokens.weight[idx] * 6.0, atol=1e-6)
    # Gemma 7B's width in bfloat16: sqrt(3072) = 55.43 is rounded to 55.5 before it multiplies.
    model = Gemma(tiny(n_embd=3072, n_head=1, head_size=2, n_layer=1, mlp_hidden=2)).to(torch.bfloat16).eval()
    embeddings = model.model.embed_tokens.weight[idx]
    assert torch.tensor(math.sqrt(3072), dtype=torch.bfloat16).item() == 55.5
    assert torch.equal(first_block_input(model, idx), embeddings * torch.tensor(55.5, dtype=torch.bfloat16))
    assert not torch.equal(first_block_input(model, idx), (embeddings.float() * math.sqrt(3072)).to(torch.bfloat16))


def test_weights_have_hugging_faces_names_the_head_size_and_a_tied_head():
    model = Gemma(tiny(n_kv_head=2))
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (4 * 6, 16) and attn.o_proj.weight.shape == (16, 4 * 6)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 6, 16)  # n_kv_head * head_size
    assert model.model.rotary_emb.cos.shape == (12, 6)  # RoPE turns head_size features
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_params() == sum(p.numel() for name, p in model.state_dict().items() if name != "lm_head.weight")
    assert all(torch.all(p == 0) for name, p in model.named_parameters() if name.endswith("norm.weight"))
    assert not any("bias" in name for name in model.state_dict())
    cache = gemma.KVCache(model.config, 3, "cpu", torch.float32)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 12, 6)  # n_layer x (B, n_kv_head, block_size, head_size)


HEAD_SHAPES = dict(n_head=st.integers(1, 4), group=st.sampled_from([1, 2]), half_head=st.integers(1, 5),
                   n_embd=st.integers(1, 24), length=st.integers(2, 20), seed=st.integers(0, 100))


def assert_caches_as_the_full_forward(module, model_class, config, length, seed):
    """Past the context (block_size 8) too: greedy tokens with the cache, without it, and from full
    forwards agree, for a model file with a head size of its own."""
    model = randomize(model_class(config).double(), std=0.5, seed=seed)
    prompt = torch.randint(0, 40, (2, min(length, 8)), generator=torch.Generator().manual_seed(seed))
    cache = module.KVCache(config, 2, "cpu", torch.float64)
    pieces = [model(prompt[:, :1], kv_cache=cache)[0], model(prompt[:, 1:], kv_cache=cache)[0]]
    assert torch.allclose(torch.cat(pieces, dim=1), model(prompt)[0], atol=1e-10)
    out = model.generate(prompt, length, temperature=0)
    assert torch.equal(model.generate(prompt, length, temperature=0, use_cache=False), out)
    for t in range(prompt.size(1), out.size(1)):
        assert torch.equal(out[:, t], model(out[:, max(0, t - 8) : t])[0][:, -1].argmax(-1))


@settings(max_examples=20, deadline=None)
@given(**HEAD_SHAPES)
def test_any_head_size_caches_and_generates_as_the_full_forward(n_head, group, half_head, n_embd, length, seed):
    config = tiny(n_head=n_head * group, n_kv_head=n_head, head_size=2 * half_head, n_embd=n_embd, block_size=8)
    assert_caches_as_the_full_forward(gemma, Gemma, config, length, seed)


def test_head_size_apart_from_n_embd_trains_and_generates(corpus, tmp_path, capsys):
    """n_embd 30 is no multiple of n_head 4: with head_size 6 the heads join to 24 features."""
    code, out, err = run_main(gemma, capsys, *train_args(corpus, tmp_path, "--max-iters", 6, "--eval-interval", 3,
                                                         "--n-embd", 30, "--head-size", 6, "--lr", "1e-2"))
    assert code == 0, err
    model = gemma.load_trained(tmp_path, torch.device("cpu"))[0]
    assert model.config.n_embd == 30 and model.config.head_size == 6
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (30, 24)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert float(rows[-1].split(",")[4]) < float(rows[1].split(",")[4])  # val loss at step 6 below step 3's
    argv = ["sample", "--out-dir", tmp_path, "--prompt", "Мой дядя", "--max-new-tokens", 40, "--temperature", 0,
            "--device", "cpu"]  # past the context of 16
    code, out, err = run_main(gemma, capsys, *argv)
    assert code == 0 and out.startswith("Мой дядя") and "tokens in" in err, err
    assert run_main(gemma, capsys, *argv, "--no-cache")[:2] == (0, out)


def hf_gemma(folder, seed=0, **kwargs):
    """A random small transformers GemmaForCausalLM (weights far from its init),
    n_head * head_dim (48) apart from hidden_size (32), saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()  # its progress bars would go to the stderr tests read
    torch.manual_seed(seed)
    settings = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=12, max_position_embeddings=16, rms_norm_eps=1e-6,
                    rope_theta=500.0)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**settings, **kwargs})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # norm gains 1 + w around 1
    model.save_pretrained(folder)
    return model


RELEASED = dict(hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")  # google/gemma-7b's config.json


@pytest.mark.parametrize("kwargs, edits", [(dict(), {}), (dict(num_key_value_heads=2), {}),  # MQA, GQA
                                           (dict(num_key_value_heads=4, head_dim=6), {}), (dict(), RELEASED)])
def test_logits_equal_transformers_gemma(kwargs, edits, tmp_path):
    reference = hf_gemma(tmp_path, **kwargs)
    edit_config(**edits)(tmp_path)
    ours = Gemma.from_pretrained(tmp_path)
    config = reference.config
    assert (ours.config.n_kv_head, ours.config.head_size) == (config.num_key_value_heads, config.head_dim)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
    assert torch.allclose(ours(idx)[0], expected, atol=1e-4, rtol=0)
    assert set(ours.state_dict()) == set(reference.state_dict())


def test_greedy_text_equals_transformers_generate_also_through_init_from(tmp_path, capsys):
    reference = hf_gemma(tmp_path, num_key_value_heads=2).double()
    assert_greedy_ids_equal_generate(gemma, Gemma, reference, tmp_path, capsys)


def test_train_init_from_starts_from_the_reference(trained, corpus, tmp_path, capsys):
    """The run's data, the folder's tokenizer (the run's), shape and weights (tied, head_size 12, one KV head)."""
    out_dir = shutil.copytree(trained("gemma"), tmp_path / "run", ignore=shutil.ignore_patterns("ckpt.pt"))
    reference = hf_gemma(tmp_path / "hf", vocab_size=bpe.Tokenizer.load(out_dir / "tokenizer.json").vocab_size)
    bpe.Tokenizer.load(out_dir / "tokenizer.json").save_pretrained(tmp_path / "hf")  # as export writes it
    argv = train_args(corpus, out_dir, "--init-from", tmp_path / "hf", "--max-iters", 1, "--lr", "1e-9")
    assert run_main(gemma, capsys, *argv)[0] == 0
    model = gemma.load_trained(out_dir, torch.device("cpu"))[0]
    assert (model.config.head_size, model.config.n_kv_head, model.config.rope_theta) == (12, 1, 500.0)
    assert torch.allclose(model.model.embed_tokens.weight, reference.model.embed_tokens.weight, atol=1e-6)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("spoil, key", [
    (edit_config(model_type="llama", architectures=["LlamaForCausalLM"]), "GemmaForCausalLM"),
    (edit_config(hidden_act="silu"), "hidden_act"),
    (edit_config(hidden_activation="gelu"), "hidden_activation"),  # the exact GELU, in transformers 4
    (edit_config(tie_word_embeddings=False), "tie_word_embeddings"),
    (edit_config(head_dim=7), "head_size"),
    (edit_config(head_dim=8), "model.layers.0.self_attn.q_proj.weight"),
])
def test_a_bad_init_from_folder_gives_one_line(spoil, key, tmp_path, capsys):
    hf_gemma(tmp_path)
    spoil(tmp_path)
    assert_init_from_refuses(gemma, tmp_path, key, capsys)
