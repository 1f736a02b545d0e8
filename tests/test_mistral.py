"""What only mistral.py has: sliding-window attention, the model on any length, the rolling-buffer
KV-cache and chunked prefill, Hugging Face's MistralForCausalLM as the reference (loaded with
--init-from), and the command line's --sliding-window. What it shares with llama.py (RMSNorm, RoPE,
SwiGLU, grouped-query attention) is tested in test_llama.py; what every model file must do, in
test_models.py, which also checks, for mistral, cached decoding against the full forward up to
4 * block_size, and greedy generation against the full forward over the whole, uncropped text."""

import json

import pytest
import torch
from conftest import one_line_error, randomize, run_main, train_args
from hypothesis import given, settings
from hypothesis import strategies as st
from test_llama import assert_init_from_refuses, edit_config, hf_llama

import mistral
from mistral import Mistral, MistralConfig


def random_config(data):
    """A small random MistralConfig: its window shorter or longer than block_size, 1 to 3 layers, any GQA group."""
    n_kv_head, group = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    return MistralConfig(
        vocab_size=data.draw(st.integers(2, 50)), block_size=data.draw(st.integers(1, 10)),
        n_layer=data.draw(st.integers(1, 3)), n_head=n_kv_head * group, n_kv_head=n_kv_head,
        n_embd=n_kv_head * group * 2 * data.draw(st.integers(1, 3)), multiple_of=4,
        sliding_window=data.draw(st.integers(1, 8)))


def test_config_rejects_a_window_below_one():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="sliding_window"):
            MistralConfig(sliding_window=bad)


def test_the_default_window_is_shorter_than_the_training_context():
    config = MistralConfig()
    assert config.sliding_window < config.block_size <= config.n_layer * (config.sliding_window - 1)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_token_reaches_n_layer_times_window_minus_one_positions(data):
    """Changing the token at p changes no logits before p, and none after p + n_layer * (W - 1), where the
    stacked windows end; the last one it reaches does change. In float64, at up to 4 times block_size;
    weights gentle enough that no attention weight rounds a path to nothing."""
    config = random_config(data)
    model = randomize(Mistral(config).double(), std=0.2, seed=data.draw(st.integers(0, 99)))
    reach = config.n_layer * (config.sliding_window - 1)
    length = data.draw(st.integers(1, 4 * config.block_size + reach + 2))
    idx = torch.tensor([data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=length, max_size=length))])
    p = data.draw(st.integers(0, length - 1))
    changed = idx.clone()
    changed[0, p] = (idx[0, p] + data.draw(st.integers(1, config.vocab_size - 1))) % config.vocab_size
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[:, :p], after[:, :p], atol=1e-12, rtol=0)
    assert torch.allclose(before[:, p + reach + 1 :], after[:, p + reach + 1 :], atol=1e-12, rtol=0)
    if p + reach < length:
        assert not torch.allclose(before[:, p + reach], after[:, p + reach], atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_chunked_prefill_gives_the_full_forwards_logits(data):
    """stream() sends a long prompt through the cache in chunks of at most W tokens, then one token
    per step; the chunks' logits are the full forward's over the prompt, within 1e-5. In float64: float32's
    rounding alone reaches 1.03e-5 on some prompts, the two paths summing in another order."""
    config = random_config(data)
    model = randomize(Mistral(config).double(), std=0.2, seed=data.draw(st.integers(0, 99)))
    length, batch = data.draw(st.integers(1, 4 * config.block_size + 8)), data.draw(st.integers(1, 2))
    row = st.lists(st.integers(0, config.vocab_size - 1), min_size=length, max_size=length)
    prompt = torch.tensor(data.draw(st.lists(row, min_size=batch, max_size=batch)))
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append((args[0].size(1), output[0])))
    list(model.stream(prompt, 3, temperature=0))
    W = config.sliding_window
    prefill = len(calls) - 2  # the last two calls are the two decoding steps, one token each
    assert [n for n, _ in calls] == [min(W, length - start) for start in range(0, length, W)] + [1, 1]
    chunks = torch.cat([logits for _, logits in calls[:prefill]], dim=1)
    assert torch.allclose(chunks, model(prompt)[0], atol=1e-5, rtol=0)


def test_the_rolling_cache_writes_position_p_in_slot_p_mod_W_and_keeps_W_slots():
    """After 37 tokens fed in chunks, slot p % W of layer 0 holds position p's key: RoPE-turned k_proj of
    the normed embedding, for each of the last W positions. The buffers never grow."""
    config = MistralConfig(vocab_size=40, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, multiple_of=8,
                           sliding_window=5)
    model = randomize(Mistral(config).double())
    idx = torch.randint(0, 40, (2, 37), generator=torch.Generator().manual_seed(0))
    cache = mistral.KVCache(config, 2, "cpu", torch.float64)
    for a, b in [(0, 3), (3, 9), (9, 10), (10, 30), (30, 31), (31, 37)]:
        model(idx[:, a:b], kv_cache=cache)
        assert cache.pos == b and all(k.shape == (2, 2, 5, 4) for k in cache.k + cache.v)
    block = model.model.layers[0]
    k = block.self_attn.k_proj(block.input_layernorm(model.model.embed_tokens(idx)))  # (2, 37, 2 * 4)
    k = mistral.apply_rope(k.view(2, 37, 2, 4).transpose(1, 2), *model.model.rotary_emb(0, 37))  # (2, 2, 37, 4)
    for p in range(32, 37):
        assert torch.allclose(cache.k[0][:, :, p % 5], k[:, :, p], atol=1e-12)


def test_rope_is_computed_for_any_position():
    """Positions far past block_size turn by m * theta_i, as llama.py's table does up to block_size."""
    config = MistralConfig(n_embd=8, n_head=1, n_kv_head=1, block_size=4)
    cos, sin = mistral.RotaryEmbedding(config)(1000, 3)  # (3, 8)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = torch.outer(torch.arange(1000, 1003, dtype=torch.float64), inv_freq).repeat(1, 2)
    assert cos.shape == (3, 8) and torch.allclose(cos.double(), angles.cos(), atol=1e-4)
    assert torch.allclose(sin.double(), angles.sin(), atol=1e-4)


# -----------------------------------------------------------------------------
# Against the reference: transformers' MistralForCausalLM


def hf_mistral(folder, **kwargs):
    """test_llama's random small model as a MistralForCausalLM, saved in folder, its window, 5, shorter than
    the test sequences; no end-of-text token, so that generate goes on to the end."""
    return hf_llama(folder, family="Mistral", **{"sliding_window": 5, "eos_token_id": None, **kwargs})


@pytest.mark.parametrize("kwargs", [dict(num_key_value_heads=4), dict(num_key_value_heads=2),
                                    dict(num_key_value_heads=1, num_hidden_layers=3, sliding_window=3),
                                    dict(tie_word_embeddings=True, sliding_window=16)])
def test_logits_equal_transformers_mistral(kwargs, tmp_path):
    """40 tokens: past the window and past max_position_embeddings (16), the training context."""
    reference = hf_mistral(tmp_path, **kwargs)
    ours = Mistral.from_pretrained(tmp_path)
    assert ours.config.sliding_window == reference.config.sliding_window
    assert ours.config.n_kv_head == reference.config.num_key_value_heads
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
    assert torch.allclose(ours(idx)[0], expected, atol=1e-4, rtol=0)
    assert set(ours.state_dict()) == set(reference.state_dict())


def test_a_null_window_is_a_window_of_the_whole_context(tmp_path):
    """sliding_window null in config.json (Mistral 7B v0.2 on) attends to every position; a window of
    max_position_embeddings is the same model on every text that fits those positions."""
    reference = hf_mistral(tmp_path, sliding_window=None)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] is None
    ours = Mistral.from_pretrained(tmp_path)
    assert ours.config.sliding_window == ours.config.block_size == 16
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], reference(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_key_value_heads", [1, 4])
def test_greedy_text_equals_transformers_generate_past_the_window(num_key_value_heads, tmp_path, capsys):
    """30 new tokens after 5, past the window of 5 and max_position_embeddings of 16, in float64, with
    the rolling cache and without; `sample --init-from` gives our float32 model's, ids out (no tokenizer)."""
    reference = hf_mistral(tmp_path, num_key_value_heads=num_key_value_heads).double()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = reference.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert expected.size(1) == 35
    ours = Mistral.from_pretrained(tmp_path).double()
    assert torch.equal(ours.generate(prompt, 30, temperature=0), expected)
    assert torch.equal(ours.generate(prompt, 30, temperature=0, use_cache=False), expected)
    code, out, _ = run_main(mistral, capsys, "sample", "--init-from", tmp_path, "--prompt-ids", 3, 1, 4, 1, 5,
                            "--max-new-tokens", 30, "--temperature", 0, "--device", "cpu")
    expected = Mistral.from_pretrained(tmp_path).generate(prompt, 30, temperature=0)
    assert code == 0 and out.split() == [str(id) for id in expected[0].tolist()]


@pytest.mark.parametrize("spoil, key", [
    (edit_config(model_type="llama", architectures=["LlamaForCausalLM"]), "MistralForCausalLM"),
    (edit_config(sliding_window=0), "sliding_window"),
    (edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "RoPE"),
    (edit_config(head_dim=16), "head_dim"),
    (lambda folder: (folder / "model.safetensors").unlink(), "model.safetensors"),
])
def test_a_bad_init_from_folder_gives_one_line(spoil, key, tmp_path, capsys):
    hf_mistral(tmp_path)
    spoil(tmp_path)
    assert_init_from_refuses(mistral, tmp_path, key, capsys)


# -----------------------------------------------------------------------------
# Command line


def test_sliding_window_flag_trains_and_samples_past_the_window(corpus, tmp_path, capsys):
    """--sliding-window 4 under a context of 16: the checkpoint keeps it, and greedy text past both
    is the same with the rolling cache and without it; 0 is refused in one line."""
    code, _, err = run_main(mistral, capsys, *train_args(corpus, tmp_path, "--max-iters", 2, "--sliding-window", 4))
    assert code == 0, err
    assert mistral.load_trained(tmp_path, torch.device("cpu"))[0].config.sliding_window == 4
    argv = ["sample", "--out-dir", tmp_path, "--prompt", "Мой дядя", "--max-new-tokens", 40, "--temperature", 0,
            "--device", "cpu"]
    cached, uncached = run_main(mistral, capsys, *argv), run_main(mistral, capsys, *argv, "--no-cache")
    assert cached[0] == uncached[0] == 0 and cached[1] == uncached[1]
    code, _, err = run_main(mistral, capsys, *train_args(corpus, tmp_path / "new", "--sliding-window", 0))
    assert one_line_error(code, err, "sliding_window"), err
