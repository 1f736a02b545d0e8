"""What only qwen3.py has: QK-norm, a head size apart from the width, Qwen3's defaults, and
Hugging Face's Qwen3ForCausalLM as the reference (loaded with --init-from).
What every model file must do is tested in test_models.py."""

import json

import pytest
import torch
from conftest import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gemma import HEAD_SHAPES, IMPOSSIBLE_HEADS, assert_caches_as_the_full_forward
from test_llama import assert_greedy_ids_equal_generate, assert_init_from_refuses, edit_config, hf_llama

import qwen3
from qwen3 import Qwen3, Qwen3Config


def tiny(**kwargs):
    """n_head * head_size (24) is not n_embd (16)."""
    return Qwen3Config(**{**dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=16, head_size=6,
                                 n_kv_head=2, multiple_of=8), **kwargs})


@pytest.mark.parametrize("kwargs, key", IMPOSSIBLE_HEADS)
def test_config_rejects_impossible_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        Qwen3Config(**kwargs)


def test_config_defaults_are_qwen3s():
    config = Qwen3Config()
    assert config.rope_theta == 1e6 and config.head_size == config.n_embd // config.n_head
    assert not config.tie_embeddings  # the same shape as llama.py's; --tie-embeddings for Qwen3's small ones
    assert Qwen3Config(n_embd=30, n_head=8, n_kv_head=4, head_size=4).head_size == 4  # n_embd need not divide
    model = Qwen3(tiny())
    assert not any("bias" in name for name in model.state_dict())
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (24, 16) and attn.o_proj.weight.shape == (16, 24)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (6,)  # one gain per feature of a head


def logits_after_scaling(name, factor, seed, qk_norm=True):
    """The logits of a random model before and after its q_proj (or k_proj) weights are scaled."""
    model = randomize(Qwen3(tiny(norm_eps=1e-30)).double(), std=0.5, seed=seed)
    for block in model.model.layers:
        if not qk_norm:
            block.self_attn.q_norm = block.self_attn.k_norm = torch.nn.Identity()
    idx = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(seed))
    before = model(idx)[0]
    with torch.no_grad():
        for block in model.model.layers:
            getattr(block.self_attn, name).weight.mul_(factor)
    return before, model(idx)[0]


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(["q_proj", "k_proj"]), factor=st.floats(0.05, 20.0), seed=st.integers(0, 100))
def test_qk_norm_makes_the_logits_blind_to_the_scale_of_queries_and_keys(name, factor, seed):
    """Scaling q_proj (or k_proj) by any positive factor changes no logit; without the norm it does."""
    before, after = logits_after_scaling(name, factor, seed)
    # RMSNorm computes in float32: equal to its rounding.
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    before, after = logits_after_scaling(name, 3.0, seed, qk_norm=False)
    assert not torch.allclose(before, after, atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(**HEAD_SHAPES)
def test_any_head_size_caches_and_generates_as_the_full_forward(n_head, group, half_head, n_embd, length, seed):
    config = tiny(n_head=n_head * group, n_kv_head=n_head, head_size=2 * half_head, n_embd=n_embd, block_size=8)
    assert_caches_as_the_full_forward(qwen3, Qwen3, config, length, seed)


def hf_qwen3(folder, seed=0, **kwargs):
    """A random small transformers Qwen3ForCausalLM (weights far from its init), n_head * head_dim
    (48) apart from hidden_size (32), saved with save_pretrained."""
    return hf_llama(folder, seed, family="Qwen3", **{"head_dim": 12, **kwargs})


@pytest.mark.parametrize("kwargs", [dict(), dict(tie_word_embeddings=True), dict(num_key_value_heads=4, head_dim=6),
                                    dict(num_key_value_heads=1, head_dim=8, rope_theta=1e6)])
def test_logits_equal_transformers_qwen3(kwargs, tmp_path):
    reference = hf_qwen3(tmp_path, **kwargs)
    ours = Qwen3.from_pretrained(tmp_path)
    config = reference.config
    assert (ours.config.n_kv_head, ours.config.head_size) == (config.num_key_value_heads, config.head_dim)
    assert ours.config.tie_embeddings == config.tie_word_embeddings
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
    assert torch.allclose(ours(idx)[0], expected, atol=1e-4, rtol=0)
    assert set(ours.state_dict()) == set(reference.state_dict())


def test_greedy_text_equals_transformers_generate_also_through_init_from(tmp_path, capsys):
    reference = hf_qwen3(tmp_path, tie_word_embeddings=True).double()
    assert_greedy_ids_equal_generate(qwen3, Qwen3, reference, tmp_path, capsys)


@pytest.mark.parametrize("left_out", [["head_dim"], ["num_key_value_heads"], ["rope_theta", "rope_parameters"]])
def test_a_config_without_a_key_reads_as_transformers_reads_it(left_out, tmp_path):
    """transformers' Qwen3 defaults: head_dim 128, 32 key/value heads, rope_theta 10000."""
    transformers = pytest.importorskip("transformers")
    hf_qwen3(tmp_path, num_attention_heads=32, num_key_value_heads=8, head_dim=4, rope_theta=500.0)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in left_out:
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = qwen3.config_from_pretrained(tmp_path)
    assert (ours.head_size, ours.n_kv_head) == (theirs.head_dim, theirs.num_key_value_heads)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]


@pytest.mark.parametrize("changes, key", [
    (dict(use_sliding_window=True, sliding_window=4), "use_sliding_window"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="qwen2"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_init_from_refuses_what_qwen3_py_does_not_compute(changes, key, tmp_path, capsys):
    hf_qwen3(tmp_path)
    edit_config(**changes)(tmp_path)
    assert_init_from_refuses(qwen3, tmp_path, key, capsys)
