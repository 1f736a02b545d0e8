"""What only gemma3.py has: local and global layers with their caches, sandwich norms,
QK-norm or soft-capping, two RoPE bases, and Hugging Face's Gemma3ForCausalLM and
Gemma2ForCausalLM as the references (loaded with --init-from).
What every model file must do is tested in test_models.py."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from test_llama import assert_greedy_ids_equal_generate, assert_init_from_refuses, edit_config

import bpe
import gemma3
from gemma3 import Gemma3, Gemma3Config, KVCache


def tiny(**kwargs):
    """Four layers, every second global, windows of 3."""
    return Gemma3Config(**{**dict(vocab_size=40, block_size=16, n_layer=4, n_head=4, n_embd=16, head_size=6,
                                  n_kv_head=2, multiple_of=8, sliding_window=3, sliding_window_pattern=2), **kwargs})


def test_config_defaults_are_gemma3s():
    config = Gemma3Config()
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4) and config.qk_norm
    assert config.query_pre_attn_scalar == config.head_size  # the plain 1 / sqrt(head_size) scale
    assert [gemma3.is_local(config, layer) for layer in range(config.n_layer)] == [True] * 5 + [False]
    for bad, key in [(dict(sliding_window=0), "sliding_window"), (dict(sliding_window_pattern=0), "pattern"),
                     (dict(qk_norm="yes"), "qk_norm"), (dict(rope_local_theta=1.0), "rope_local_theta"),
                     (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
                     (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping")]:
        with pytest.raises(ValueError, match=key):
            tiny(**bad)


def test_the_blocks_are_sandwiched_and_the_norms_are_where_the_config_says():
    block = Gemma3(tiny()).model.layers[0]
    names = [name for name, _ in block.named_children()]
    assert names == ["input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "mlp", "post_feedforward_layernorm"]
    assert block.self_attn.q_norm.weight.shape == (6,)  # one gain per feature of a head
    gemma2 = Gemma3(tiny(qk_norm=False)).model.layers[0].self_attn
    assert not any("norm" in name for name in gemma2.state_dict())


def test_the_cache_holds_windows_for_the_local_layers_and_the_context_for_the_global_ones():
    config = tiny(n_layer=6, sliding_window_pattern=3, block_size=64, sliding_window=8)
    cache = KVCache(config, 1, "cpu", torch.float32)
    assert [k.size(2) for k in cache.k] == [8, 8, 64, 8, 8, 64]
    bytes_per_token = sum(k.numel() + v.numel() for k, v in zip(cache.k, cache.v)) * 4 / 64
    assert bytes_per_token == (4 * 8 + 2 * 64) * 2 * 2 * 6 * 4 / 64  # slots * (k, v) * heads * head_size * 4 B


def changed_outputs(config, p, seed=0):
    """Where the logits of a random model change when token p changes."""
    model = randomize(Gemma3(config).double(), std=0.5, seed=seed)
    idx = torch.randint(0, config.vocab_size, (1, config.block_size), generator=torch.Generator().manual_seed(seed))
    changed = idx.clone()
    changed[0, p] = (changed[0, p] + 1) % config.vocab_size
    with torch.no_grad():
        return (model(idx)[0] - model(changed)[0]).abs().amax(-1)[0] > 1e-9


@settings(max_examples=15, deadline=None)
@given(n_layer=st.integers(1, 3), window=st.integers(1, 4), p=st.integers(0, 5), seed=st.integers(0, 50))
def test_local_layers_reach_n_layer_times_window_minus_one_back_and_a_global_layer_everywhere(n_layer, window, p,
                                                                                               seed):
    reach = p + n_layer * (window - 1)
    config = tiny(n_layer=n_layer, sliding_window=window, sliding_window_pattern=n_layer + 1, block_size=20)
    changed = changed_outputs(config, p, seed)
    assert not changed[:p].any() and not changed[reach + 1 :].any()
    assert changed[p] and changed[reach]
    # The last layer global: every position after p sees the change.
    assert changed_outputs(replace(config, sliding_window_pattern=n_layer), p, seed)[p:].all()


def test_soft_capping_bounds_the_scores_and_the_logits():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) * 30 for _ in range(3))
    out = gemma3.attention(q, k, v, 3, 0.5, softcap=2.0)
    scores = 2.0 * torch.tanh(q @ k.transpose(-2, -1) * 0.5 / 2.0)
    band = torch.ones(5, 5, dtype=torch.bool).tril().triu(-2)
    assert torch.allclose(out, scores.masked_fill(~band, float("-inf")).softmax(-1) @ v, atol=1e-12)
    model = randomize(Gemma3(tiny(qk_norm=False, final_logit_softcapping=1.5)), std=2.0)
    logits = model(torch.randint(0, 40, (2, 16)))[0]
    assert 1.0 < logits.abs().max() <= 1.5  # capped, and the cap binds


def test_qk_norm_makes_the_logits_blind_to_the_scale_of_the_queries():
    model = randomize(Gemma3(tiny(norm_eps=1e-30)).double(), std=0.5)
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(idx)[0]
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(7.0)
    assert torch.allclose(model(idx)[0], before, atol=1e-5)


def hf_gemma3(folder, family="Gemma3", seed=0, **kwargs):
    """A random small transformers Gemma3ForCausalLM (or Gemma2ForCausalLM) with weights far
    from its init, n_head * head_dim (48) apart from hidden_size (32), 16 positions and
    windows of 3, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()  # its progress bars would go to the stderr tests read
    torch.manual_seed(seed)
    settings = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12, max_position_embeddings=16, rms_norm_eps=1e-6,
                    sliding_window=3, query_pre_attn_scalar=12)
    config_class = getattr(transformers, "Gemma3TextConfig" if family == "Gemma3" else "Gemma2Config")
    config = config_class(**{**settings, **kwargs})
    # Gemma 2's soft-capping is in transformers' eager attention only.
    config._attn_implementation = "eager"
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # norm gains 1 + w around 1
    model.save_pretrained(folder)
    return model


GEMMA3_ROPE = dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})
REFERENCES = [
    ("Gemma3", dict(layer_types=["sliding_attention", "full_attention"] * 2)),
    ("Gemma3", dict(layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
                    sliding_window=2)),  # pattern 3
    ("Gemma3", dict(query_pre_attn_scalar=20, num_key_value_heads=1, **GEMMA3_ROPE)),  # pattern 6: all local
    ("Gemma3", dict(layer_types=["full_attention"] * 4, final_logit_softcapping=3.0)),
    ("Gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rope_theta=300.0)),
    ("Gemma2", dict(sliding_window=5, num_key_value_heads=4, head_dim=6)),
]


@pytest.mark.parametrize("family, kwargs", REFERENCES)
def test_logits_equal_transformers(family, kwargs, tmp_path):
    reference = hf_gemma3(tmp_path, family, **kwargs)
    ours = Gemma3.from_pretrained(tmp_path)
    types = reference.config.layer_types
    assert [gemma3.is_local(ours.config, i) for i in range(4)] == [t == "sliding_attention" for t in types]
    assert ours.config.qk_norm == (family == "Gemma3")
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
    assert torch.allclose(ours(idx)[0], expected, atol=1e-4, rtol=0)
    assert set(ours.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("family, kwargs", [REFERENCES[0], REFERENCES[4]])
def test_greedy_text_past_the_window_equals_transformers_generate_also_through_init_from(family, kwargs, tmp_path,
                                                                                          capsys):
    reference = hf_gemma3(tmp_path, family, **kwargs).double()
    assert_greedy_ids_equal_generate(gemma3, Gemma3, reference, tmp_path, capsys)


def test_transformers_4_keys_read_as_transformers_reads_them(tmp_path):
    """The released config.json files: rope_theta, rope_local_base_freq, sliding_window_pattern."""
    transformers = pytest.importorskip("transformers")
    hf_gemma3(tmp_path, num_hidden_layers=5)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters", "_sliding_window_pattern"):
        config.pop(key, None)
    config.update(rope_theta=7000.0, rope_local_base_freq=70.0, sliding_window_pattern=3)
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = gemma3.config_from_pretrained(tmp_path)
    assert [gemma3.is_local(ours, i) for i in range(5)] == [t == "sliding_attention" for t in theirs.layer_types]
    assert ours.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"] == 7000.0
    assert ours.rope_local_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"] == 70.0


@pytest.mark.parametrize("changes, key", [
    (dict(layer_types=["full_attention", "sliding_attention"] * 2), "layer_types"),
    (dict(layer_types="sliding_attention"), "layer_types"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "linear"),
    (dict(model_type="gemma"), "model_type"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
])
def test_init_from_refuses_what_gemma3_py_does_not_compute(changes, key, tmp_path, capsys):
    hf_gemma3(tmp_path)
    edit_config(**changes)(tmp_path)
    assert_init_from_refuses(gemma3, tmp_path, key, capsys)


def test_a_model_without_qk_norm_exports_as_gemma2(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = bpe.Tokenizer.train(["мой дядя самых честных правил"] * 3, 300)
    config = tiny(vocab_size=tok.vocab_size, qk_norm=False, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                  rope_local_theta=1e6)
    model = randomize(Gemma3(config), std=0.3)
    gemma3.export(model, tok, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert type(theirs).__name__ == "Gemma2ForCausalLM"
    idx = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, model(idx)[0], atol=1e-4)
    for bad, key in [(dict(rope_local_theta=1e4), "one RoPE"), (dict(qk_norm=True), "soft-capping")]:
        with pytest.raises(ValueError, match=key):
            gemma3.export(Gemma3(replace(config, **bad)), tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything is written
