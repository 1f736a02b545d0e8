"""What only gpt_oss.py has: attention sinks, windowed and full layers alternating with
their caches, the clamped SwiGLU experts with biases, YaRN's RoPE, MXFP4 weights, and
Hugging Face's GptOssForCausalLM as the reference (loaded with --init-from). What every
model file must do is tested in test_models.py; dispatch by expert and the balance loss,
which gpt_oss.py shares with mixtral.py, in test_mixtral.py."""

import math

import pytest
import torch
from conftest import TINY, randomize, run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from test_llama import assert_greedy_ids_equal_generate, assert_init_from_refuses, edit_config
from test_mixtral import fine_tuned_from

import gpt_oss
from gpt_oss import GptOss, GptOssConfig, KVCache


def tiny(**kwargs):
    """Four layers, windows of 3, heads of 6 apart from n_embd."""
    return GptOssConfig(**{**dict(vocab_size=40, block_size=16, n_layer=4, n_head=4, n_embd=16, head_size=6,
                                  n_kv_head=2, multiple_of=8, sliding_window=3, n_expert=4), **kwargs})


def test_config_rejects_impossible_values():
    for bad, key in [(dict(swiglu_limit=0.0), "swiglu_limit"), (dict(head_size=5), "head_size"),
                     (dict(rope_scaling={"factor": 4.0}), "rope_scaling"),
                     (dict(rope_scaling=dict(factor=None, original_max_position_embeddings=8, beta_fast=32,
                                             beta_slow=1, truncate=False)), "numbers"),
                     (dict(rope_scaling=dict(factor=4.0, original_max_position_embeddings=8, beta_fast=1,
                                             beta_slow=32, truncate=False)), "beta_slow")]:
        with pytest.raises(ValueError, match=key):
            tiny(**bad)


# -----------------------------------------------------------------------------
# The sinks, the layers and the experts


@pytest.mark.parametrize("fused", [True, False])
def test_a_large_sink_takes_the_heads_attention_and_a_small_one_none(fused, monkeypatch):
    monkeypatch.setattr(gpt_oss, "FUSED", fused)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([30.0, -math.inf, 0.0], dtype=torch.float64)
    out = gpt_oss.attention(q, k, v, 4, sinks)
    assert out[:, 0].abs().max() < 1e-6  # the sink takes everything: the head attends to nothing
    plain = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.bool).tril().triu(-3))
    assert torch.allclose(out[:, 1], plain[:, 1], atol=1e-12)  # no sink: softmax attention
    assert out[:, 2].norm() < plain[:, 2].norm()  # a sink of 0: one more share, to no value


def test_a_heads_sink_gets_a_gradient():
    model = randomize(GptOss(tiny()))
    idx = torch.randint(0, 40, (2, 16))
    model.train()(idx, targets=idx)[1].backward()
    assert all(block.self_attn.sinks.grad.abs().min() > 0 for block in model.model.layers)


def test_layers_alternate_windowed_first_and_the_cache_holds_exactly_their_slots():
    config = tiny(n_layer=5, block_size=64, sliding_window=8)
    assert [GptOss(config).model.layers[i].self_attn.window for i in range(5)] == [8, 64, 8, 64, 8]
    cache = KVCache(config, 1, "cpu", torch.float32)
    assert [k.size(2) for k in cache.k] == [8, 64, 8, 64, 8] and [v.size(2) for v in cache.v] == [8, 64, 8, 64, 8]
    assert all(k.shape[:2] == (1, 2) and k.size(3) == 6 for k in cache.k + cache.v)  # n_kv_head, head_size
    assert set(vars(cache)) == {"k", "v", "pos", "window"}


def changed_outputs(config, p):
    """Where the logits of a random model change when token p changes."""
    model = randomize(GptOss(config).double(), std=0.5)
    idx = torch.randint(0, 40, (1, config.block_size), generator=torch.Generator().manual_seed(0))
    other = idx.clone()
    other[0, p] = (idx[0, p] + 1) % 40
    with torch.no_grad():
        return ((model(idx)[0] - model(other)[0]).abs().amax(-1)[0] > 1e-9).nonzero().flatten().tolist()


def test_a_full_layer_reaches_back_to_the_start_and_windowed_layers_only_w_back():
    """One windowed layer: token 0 reaches positions 0-2 only. Add a full layer: all of them."""
    assert changed_outputs(tiny(n_layer=1), 0) == [0, 1, 2]
    assert changed_outputs(tiny(n_layer=2), 0) == list(range(16))


def expert(limit):
    """An expert whose gate and up projections are the sum of the input's features, plus 1."""
    mlp = gpt_oss.MLP(tiny(n_embd=4, mlp_hidden=3, swiglu_limit=limit)).double()
    with torch.no_grad():
        mlp.gate_up_proj.weight.fill_(1.0)
        mlp.gate_up_proj.bias.fill_(1.0)
        torch.nn.init.normal_(mlp.down_proj.weight)
    return mlp


def test_the_clamp_binds_the_gate_from_above_and_up_on_both_sides():
    mlp = expert(2.0)
    x = torch.full((3, 4), 1.0, dtype=torch.float64)  # gate = up = 5, both clamped to 2
    limit = mlp.down_proj(torch.full((1, 3), 3 * 2 * torch.sigmoid(torch.tensor(1.702 * 2)).item(),
                                     dtype=torch.float64))
    assert torch.allclose(mlp(x), limit.expand(3, 4)) and torch.equal(mlp(x), mlp(10 * x))
    low = torch.full((1, 4), -1.0, dtype=torch.float64)  # gate = up = -3: up clamped to -2, gate not
    gate = torch.tensor(-3.0, dtype=torch.float64)
    expected = mlp.down_proj(torch.full((1, 3), -1 * (gate * torch.sigmoid(1.702 * gate)).item(), dtype=torch.float64))
    assert torch.allclose(mlp(low), expected, atol=1e-12) and not torch.allclose(mlp(low), mlp(10 * low))
    unclamped = expert(math.inf)
    assert not torch.allclose(unclamped(x), unclamped(10 * x))


def test_biases_everywhere_but_the_norms_and_the_head():
    model = GptOss(tiny())
    names = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    block = "model.layers.0."
    assert {block + f"self_attn.{p}_proj.bias" for p in "qkvo"} | {block + "mlp.router.bias"} <= names
    assert block + "mlp.experts.3.gate_up_proj.bias" in names and block + "mlp.experts.3.down_proj.bias" in names
    assert all(model.state_dict()[name].count_nonzero() == 0 for name in names)  # zero at init
    H = model.config.mlp_hidden  # 4 layers, 2 idle experts each: gate_up_proj, down_proj and their biases
    assert model.num_params() - model.num_params(active=True) == 4 * 2 * (16 * 2 * H + 2 * H + H * 16 + 16)


@settings(max_examples=15, deadline=None)
@given(n_layer=st.integers(1, 4), window=st.integers(1, 6), block_size=st.integers(2, 10),
       length=st.integers(1, 25), seed=st.integers(0, 100))
def test_cached_generation_equals_the_full_forward_past_the_context(n_layer, window, block_size, length, seed):
    """Greedy ids with the cache (windowed rolls, full re-fills) equal those without, past block_size."""
    model = randomize(GptOss(tiny(n_layer=n_layer, sliding_window=window, block_size=block_size)).double(),
                      std=0.5, seed=seed)
    prompt = torch.randint(0, 40, (2, 3), generator=torch.Generator().manual_seed(seed))
    cached = model.generate(prompt, length, temperature=0)
    assert torch.equal(cached, model.generate(prompt, length, temperature=0, use_cache=False))


# -----------------------------------------------------------------------------
# YaRN and MXFP4 against transformers

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("rope", [
    dict(factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, truncate=False),
    dict(factor=4.0, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0, truncate=True),
    dict(factor=8.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0, truncate=False),
])
def test_yarn_equals_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = transformers.GptOssConfig(hidden_size=32, num_attention_heads=4, head_dim=16, max_position_embeddings=4096,
                                   rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, **rope))
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = gpt_oss.RotaryEmbedding(tiny(head_size=16, rope_theta=150000.0, rope_scaling=rope))
    assert torch.allclose(ours.inv_freq, inv_freq, rtol=1e-6, atol=0) and ours.attention_factor == pytest.approx(factor)
    plain = gpt_oss.RotaryEmbedding(tiny(head_size=16, rope_theta=150000.0)).inv_freq
    assert plain[0] == ours.inv_freq[0] and ours.inv_freq[-1] == pytest.approx(plain[-1] / rope["factor"])


def test_mxfp4_dequantizes_as_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(120, 134, (3, 10, 2), generator=generator, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (3, 64, 10): x @ w
    assert torch.equal(gpt_oss.dequantize_mxfp4(blocks, scales), theirs.transpose(1, 2))
    # 0x21: the codes 1 (0.5), then 2 (1.0), times 2^(128 - 127)
    assert gpt_oss.dequantize_mxfp4(torch.tensor([[[0x21] + [0] * 15]], dtype=torch.uint8),
                                    torch.tensor([[128]], dtype=torch.uint8))[0, :2].tolist() == [1.0, 2.0]


def hf_gpt_oss(folder, seed=0, dtype=None, **kwargs):
    """A random small transformers GptOssForCausalLM, 3 layers, windows of 3, 16 positions, heads of 12
    apart from hidden_size (32), plain RoPE at base 500, swiglu_limit 2, with weights, biases and sinks far
    from their init; saved with save_pretrained. No end-of-text token: generate goes on to the end."""
    transformers.utils.logging.disable_progress_bar()  # its progress bars would go to the stderr tests read
    torch.manual_seed(seed)
    settings = dict(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12, max_position_embeddings=16, rms_norm_eps=1e-6,
                    sliding_window=3, num_local_experts=4, num_experts_per_tok=2, swiglu_limit=2.0,
                    rope_parameters=dict(rope_type="default", rope_theta=500.0), eos_token_id=None)
    config = transformers.GptOssConfig(**{**settings, **kwargs})
    model = transformers.GptOssForCausalLM(config).eval()
    model.set_experts_implementation("eager")  # its default, grouped_mm, has no float64
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return model


REFERENCES = [
    {},
    dict(sliding_window=2, num_key_value_heads=1, swiglu_limit=7.0),
    dict(rope_parameters=None, num_hidden_layers=2),  # gpt-oss's default: YaRN, 32 times 4096, at base 150,000
    dict(sliding_window=5, num_local_experts=6, num_experts_per_tok=3, swiglu_limit=0.5,
         rope_parameters=dict(rope_type="yarn", rope_theta=300.0, factor=4.0, original_max_position_embeddings=8,
                              beta_fast=8.0, beta_slow=1.0, truncate=True)),
]


@pytest.mark.parametrize("kwargs", REFERENCES)
def test_logits_loss_and_greedy_text_equal_transformers_gpt_oss(kwargs, tmp_path, capsys):
    """16 tokens, past the window, in float64; then 11 greedy tokens after 5, to the end of the context."""
    reference = hf_gpt_oss(tmp_path, **kwargs).double()
    ours = GptOss.from_pretrained(tmp_path).double().eval()
    assert ours.config.sliding_window == reference.config.sliding_window and ours.config.head_size == 12
    with torch.no_grad():
        assert ours.model.layers[0].self_attn.sinks.abs().min() > 0
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx, labels=idx, output_router_logits=True)
        logits, loss = ours(idx, targets=torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1))
    assert torch.allclose(logits, expected.logits, atol=1e-4, rtol=0)
    assert abs(ours.aux_loss.item() - expected.aux_loss.item()) < 1e-4
    assert abs(loss.item() - expected.loss.item()) < 1e-4  # cross-entropy + router_aux_loss_coef * aux_loss
    assert_greedy_ids_equal_generate(gpt_oss, GptOss, reference, tmp_path, capsys)


def test_reads_mxfp4_experts_as_their_dequantized_weights(tmp_path):
    """A folder with random MXFP4 experts, and the same folder with them dequantized by transformers:
    the same model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    safetensors = pytest.importorskip("safetensors.torch")
    reference = hf_gpt_oss(tmp_path)
    generator = torch.Generator().manual_seed(0)
    packed = {}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                n_expert, cols, rows = p.shape  # (n_expert, in, out): x @ w
                blocks = torch.randint(0, 256, (n_expert, rows, cols // 32, 16), generator=generator,
                                       dtype=torch.uint8)
                scales = torch.randint(122, 128, (n_expert, rows, cols // 32), generator=generator,
                                       dtype=torch.uint8)
                p.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                packed.update({name + "_blocks": blocks, name + "_scales": scales})
    reference.save_pretrained(tmp_path)
    dense = GptOss.from_pretrained(tmp_path).state_dict()
    weights = safetensors.load_file(tmp_path / "model.safetensors")
    weights = {name: w for name, w in weights.items() if name + "_blocks" not in packed}
    safetensors.save_file({**weights, **packed}, tmp_path / "model.safetensors")
    ours = GptOss.from_pretrained(tmp_path).state_dict()
    assert ours["model.layers.2.mlp.experts.3.down_proj.weight"].abs().max() > 0
    assert all(torch.equal(w, dense[name]) for name, w in ours.items())


def test_reads_bf16_safetensors_and_exports_the_experts_stacked_again(tmp_path):
    reference = hf_gpt_oss(tmp_path, dtype=torch.bfloat16)
    ours = GptOss.from_pretrained(tmp_path)
    weights = pytest.importorskip("safetensors.torch").load_file(tmp_path / "model.safetensors")
    assert weights["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    stacked = gpt_oss.stack_experts(ours.state_dict(), ours.config)
    assert set(stacked) == set(weights)
    for name, w in weights.items():
        assert torch.equal(stacked[name], w.float()), name
    assert ours.config.n_expert == reference.config.num_local_experts


def test_init_from_trains_from_the_reference_weights(trained, corpus, tmp_path, capsys):
    model, reference = fine_tuned_from(gpt_oss, hf_gpt_oss, trained, corpus, tmp_path, capsys)
    assert model.config.n_expert == 4 and model.config.swiglu_limit == 2.0 and model.config.head_size == 12
    expected = reference.state_dict()
    assert all(torch.allclose(w, expected[name], atol=1e-6) for name, w in model.state_dict().items())


@pytest.mark.parametrize("spoil, key", [
    (edit_config(model_type="mixtral", architectures=["MixtralForCausalLM"]), "GptOssForCausalLM"),
    (edit_config(layer_types=["full_attention", "sliding_attention", "full_attention"]), "alternates"),
    (edit_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "linear"),
    (edit_config(rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                                  "attention_factor": 2.0}), "yarn"),
    (edit_config(swiglu_alpha=1.0), "swiglu_alpha"),
    (edit_config(attention_bias=False), "attention_bias"),
    (edit_config(num_local_experts=5), "experts.4"),
])
def test_a_bad_init_from_folder_gives_one_line(spoil, key, tmp_path, capsys):
    hf_gpt_oss(tmp_path)
    spoil(tmp_path)
    assert_init_from_refuses(gpt_oss, tmp_path, key, capsys)


def test_new_flags_reach_the_config(corpus, tmp_path, capsys):
    code, out, _ = run_main(gpt_oss, capsys, "train", "--data", corpus, "--out-dir", tmp_path, *TINY, "--max-iters", 1,
                            "--head-size", 6, "--swiglu-limit", 3.5, "--n-expert", 3,
                            "--rope-scaling", '{"factor": 4, "original_max_position_embeddings": 8, '
                            '"beta_fast": 8, "beta_slow": 1, "truncate": false}')
    assert code == 0 and "head_size=6" in out and "swiglu_limit=3.5" in out and "'factor': 4" in out
    assert "M active per token" in out
