"""What only gpt2.py has: the tanh GELU, weight names that follow the GPT-2
checkpoint, the scaled initialisation, and the KV-cache past the context. What
every model file must do is tested in test_models.py; Hugging Face's GPT-2 in
test_gpt2_pretrained.py."""

import math

import torch
import torch.nn.functional as F
from conftest import randomize

import gpt2
from gpt2 import GPT, GPTConfig


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    assert torch.allclose(gpt2.gelu(x), F.gelu(x, approximate="tanh"), atol=1e-12, rtol=0)
    # ... and not the exact GELU, which differs by up to ~5e-4.
    assert not torch.allclose(gpt2.gelu(x), F.gelu(x), atol=1e-5, rtol=0)


def test_weight_names_follow_the_gpt2_checkpoint():
    names = set(GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=2, n_head=1, n_embd=4)).state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.weight",
                 "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias",
                 "transformer.h.1.ln_2.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                 "transformer.ln_f.weight", "lm_head.weight"]:
        assert name in names


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


def test_cache_past_the_context_is_exact_where_a_sliding_cache_is_not():
    """Past block_size, greedy generation follows the cropped-window model: each token
    is the argmax of a full forward over the last block_size tokens. A sliding cache
    would keep what the tokens still in the window computed at their old positions,
    next to the token that left: with absolute positions, that is another model."""
    config = GPTConfig(vocab_size=30, block_size=6, n_layer=2, n_head=2, n_embd=16)
    model = randomize(GPT(config).double(), std=0.5, seed=3)
    out = model.generate(torch.tensor([[1, 2, 3]]), 12, temperature=0)
    for t in range(3, 15):
        window = out[:, max(0, t - 6) : t]
        assert out[0, t] == model(window)[0][0, -1].argmax()
        if t > 6:  # the same token, at its old position with the old window, and after the slide
            stale, slid = model(out[:, t - 7 : t - 1])[0][0, -1], model(window)[0][0, -2]
            assert not torch.allclose(stale, slid, atol=1e-3)
