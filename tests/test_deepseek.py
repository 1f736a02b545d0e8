"""What only deepseek.py has: multi-head latent attention (the latent cache, absorbed and
expanded attention, decoupled RoPE), DeepSeekMoE's router (sigmoid scores, groups, the
bias that chooses but never weights) and its balancing without an auxiliary loss, with
Hugging Face's DeepseekV3ForCausalLM as the reference (loaded with --init-from). What
every model file must do is tested in test_models.py; dispatch by expert, which
deepseek.py shares with mixtral.py, in test_mixtral.py."""

import csv

import pytest
import torch
from conftest import TINY, randomize, run_main, train_args
from hypothesis import given, settings
from hypothesis import strategies as st
from test_llama import assert_greedy_ids_equal_generate, assert_init_from_refuses, edit_config, hf_llama
from test_mixtral import fine_tuned_from

import deepseek
from deepseek import DeepSeek, DeepSeekConfig


def tiny(**kwargs):
    return DeepSeekConfig(**{**dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=16,
                                    multiple_of=8, n_expert=4, n_expert_per_token=2, n_group=2,
                                    topk_group=1), **kwargs})


@pytest.mark.parametrize("kwargs, key", [
    (dict(n_expert=5), "n_group"),
    (dict(n_group=4), "n_group"),
    (dict(topk_group=3), "topk_group"),
    (dict(n_expert_per_token=3), "n_expert_per_token"),
    (dict(first_k_dense=2), "first_k_dense"),
    (dict(n_shared_expert=-1), "n_shared_expert"),
    (dict(qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(bias_update_speed=-1.0), "bias_update_speed"),
    (dict(seq_aux_loss_coef=-1.0), "seq_aux_loss_coef"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(norm_topk_prob=1), "norm_topk_prob"),
])
def test_config_rejects_impossible_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        tiny(**kwargs)


def test_default_widths_follow_n_embd_and_n_head():
    config = DeepSeekConfig(n_embd=96, n_head=4)
    assert (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (24, 12, 24)
    assert config.kv_lora_rank == 48 and config.q_lora_rank is None
    assert config.moe_hidden == config.mlp_hidden // (config.n_expert_per_token + config.n_shared_expert)
    assert DeepSeekConfig(n_embd=12, n_head=2).qk_rope_head_dim == 4  # half of 6, rounded up to even


def test_the_cache_holds_the_latent_and_the_rope_key_only():
    config = tiny(kv_lora_rank=6, qk_rope_head_dim=4)
    cache = deepseek.KVCache(config, 3, "cpu", torch.float32)
    assert [t.shape for t in cache.c_kv] == [(3, 12, 6)] * 2
    assert [t.shape for t in cache.k_rope] == [(3, 12, 4)] * 2
    assert set(vars(cache)) == {"c_kv", "k_rope", "pos"}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_absorbed_attention_equals_expanded_attention(data):
    """The decoding form (W^UK in the query, W^UV after the weights) and the paper's, on random
    shapes, float64, with and without the fused kernel."""
    draw = data.draw
    config = tiny(n_head=draw(st.integers(1, 3)), n_embd=12, kv_lora_rank=draw(st.integers(1, 9)),
                  qk_nope_head_dim=draw(st.integers(1, 7)), qk_rope_head_dim=2 * draw(st.integers(1, 3)),
                  v_head_dim=draw(st.integers(1, 7)), q_lora_rank=draw(st.none() | st.integers(1, 5)))
    attn = randomize(deepseek.MultiHeadLatentAttention(config, 0).double(), seed=draw(st.integers(0, 99)))
    T, T_k = sorted([draw(st.integers(1, 8)), draw(st.integers(1, 8))])
    generator = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    q_nope = torch.randn(2, config.n_head, T, config.qk_nope_head_dim, generator=generator, dtype=torch.float64)
    q_rope = torch.randn(2, config.n_head, T, config.qk_rope_head_dim, generator=generator, dtype=torch.float64)
    c_kv = torch.randn(2, T_k, config.kv_lora_rank, generator=generator, dtype=torch.float64)
    k_rope = torch.randn(2, T_k, config.qk_rope_head_dim, generator=generator, dtype=torch.float64)
    for fused in (True, False):
        deepseek.FUSED = fused
        try:
            expanded = attn.expanded(q_nope, q_rope, c_kv, k_rope, 0.0)
            absorbed = attn.absorbed(q_nope, q_rope, c_kv, k_rope, 0.0)
        finally:
            deepseek.FUSED = True
        assert expanded.shape == (2, config.n_head, T, config.v_head_dim)
        assert torch.allclose(absorbed, expanded, atol=1e-10)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_routing_equals_transformers_router(norm_topk_prob):
    """The same weights and biases in transformers' DeepseekV3TopkRouter: the same experts, and weights
    from the unbiased scores; float64 against its float32."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    config = tiny(n_expert=8, n_group=4, topk_group=2, n_expert_per_token=3, routed_scaling_factor=2.5,
                  norm_topk_prob=norm_topk_prob)
    router = randomize(deepseek.Router(config).double(), std=1.0)
    router.e_score_correction_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(1)))
    theirs = DeepseekV3TopkRouter(transformers.DeepseekV3Config(
        hidden_size=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob))
    theirs.load_state_dict({name: w.float() for name, w in router.state_dict().items()})
    x = torch.randn(20, 16, dtype=torch.float64)
    scores, chosen, weights = router(x)
    _, their_weights, their_chosen = theirs(x.float())
    assert torch.equal(chosen.sort(-1).values, their_chosen.sort(-1).values)
    ours = weights.gather(1, chosen.argsort(-1))
    assert torch.allclose(ours.float(), their_weights.gather(1, their_chosen.argsort(-1)), atol=1e-5)
    if norm_topk_prob:
        assert torch.allclose(weights.sum(-1), torch.full((20,), 2.5, dtype=torch.float64))


def test_sequence_balance_loss_is_per_sequence_and_summed_over_blocks():
    """1 a block for an even spread, n_expert / k for a collapsed one; and per sequence: two sequences
    collapsed onto different experts are even together, but not each."""
    even = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.1, 0.1, 0.9, 0.9]]).repeat(4, 1)[None]  # (1, 8, 4)
    loss, load = deepseek.sequence_balance_loss(even, even.topk(2, dim=-1).indices, batch_size=2)
    assert loss.item() == pytest.approx(1.0) and load.tolist() == [[4.0, 4.0, 4.0, 4.0]]
    collapsed = torch.tensor([[1.0, 1.0, 1e-6, 1e-6]]).repeat(10, 1)[None]
    loss, load = deepseek.sequence_balance_loss(collapsed, collapsed.topk(2, dim=-1).indices, 2)
    assert loss.item() == pytest.approx(2.0, rel=1e-4) and load.tolist() == [[10.0, 10.0, 0.0, 0.0]]
    apart = torch.tensor([[1.0, 1.0, 1e-6, 1e-6]] * 5 + [[1e-6, 1e-6, 1.0, 1.0]] * 5)[None]  # even as a batch
    loss, load = deepseek.sequence_balance_loss(apart, apart.topk(2, dim=-1).indices, 2)
    assert loss.item() == pytest.approx(2.0, rel=1e-4) and load.tolist() == [[5.0, 5.0, 5.0, 5.0]]
    two_blocks = torch.cat([even, even])  # (2, 8, 4)
    loss, _ = deepseek.sequence_balance_loss(two_blocks, two_blocks.topk(2, dim=-1).indices, 2)
    assert loss.item() == pytest.approx(2.0)


def test_forward_adds_the_scaled_balance_loss():
    model = randomize(DeepSeek(tiny(seq_aux_loss_coef=0.5)))
    idx = torch.randint(0, 40, (2, 12))
    logits, loss = model(idx, targets=idx)
    cross_entropy = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert loss.item() == pytest.approx(cross_entropy.item() + 0.5 * model.aux_loss.item())


def test_the_bias_update_moves_load_toward_balance():
    """A batch that block 1's router sends mostly to experts 0 and 1, and block 2's to 6 and 7 (block 0 is
    dense): each block's biases fall for its favourites and rise for the others, and over updates on the
    same batch no expert keeps more than 1.5 times the mean load; no weight changes."""
    model = randomize(DeepSeek(tiny(n_layer=3, first_k_dense=1, bias_update_speed=0.02, n_expert=8, n_group=4,
                                    topk_group=2)))
    routers = [block.mlp.gate for block in model.model.layers[1:]]
    with torch.no_grad():
        routers[0].weight[:2] += 2.0
        routers[1].weight[6:] += 2.0
    weights = {name: w.clone() for name, w in model.named_parameters()}
    idx = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    model(idx)
    before = model.expert_load.clone()  # (2, 8): 96 picks a block, 12 an expert when even
    assert not torch.equal(before[0], before[1]) and before.max() > 1.5 * 12
    model.update_bias()
    for router, load in zip(routers, before):
        bias = router.e_score_correction_bias
        assert torch.equal(bias.sign(), (load.mean() - load).sign()) and bias.abs().max() == pytest.approx(0.02)
    loads = []
    for _ in range(30):
        model(idx)
        loads.append(model.expert_load)
        model.update_bias()
    # The sign update overshoots and swings round the balance: the last 10 steps' mean load.
    assert torch.stack(loads[-10:]).mean(0).max() <= 1.5 * 12
    assert all(torch.equal(w, weights[name]) for name, w in model.named_parameters())


def test_the_biases_are_saved_and_bias_update_speed_0_keeps_them(corpus, tmp_path, capsys):
    """Trained with the default speed the biases move, and they are in the checkpoint; with 0 they stay 0."""
    biases = {}
    for speed in (DeepSeekConfig().bias_update_speed, 0.0):
        out_dir = tmp_path / str(speed)
        code, out, _ = run_main(deepseek, capsys, *train_args(corpus, out_dir, "--max-iters", 3, "--n-expert", 4,
                                                              "--n-group", 2, "--topk-group", 1,
                                                              "--n-expert-per-token", 2,
                                                              "--bias-update-speed", speed))
        assert code == 0 and "balance: aux loss" in out and "expert shares" in out
        weights = torch.load(out_dir / "ckpt.pt", weights_only=True)["weights"]
        biases[speed] = weights["model.layers.1.mlp.gate.e_score_correction_bias"]
        rows = list(csv.DictReader((out_dir / "log.csv").open()))
        assert rows and {"aux_loss", "min_expert_share", "max_expert_share"} <= rows[-1].keys()
    assert biases[0.0].abs().max() == 0
    speed = DeepSeekConfig().bias_update_speed
    assert 0 < biases[speed].abs().max() <= 3 * speed + 1e-9  # 3 steps


def test_active_parameters_leave_out_the_idle_routed_experts():
    model = DeepSeek(tiny(n_expert=4, n_expert_per_token=2, n_shared_expert=1, first_k_dense=1))
    expert = 3 * 16 * model.config.moe_hidden
    assert model.num_params() - model.num_params(active=True) == 1 * 2 * expert  # 1 MoE block, 2 idle experts


# -----------------------------------------------------------------------------
# Hugging Face's DeepSeek-V3 as the reference


def hf_deepseek(folder, dtype=None, **kwargs):
    """test_llama's random small model as a DeepseekV3ForCausalLM with MLA (latent 8, heads of 6 + 4
    query/key features and 5 value features), 4 routed experts in 2 groups, 1 shared, the first block
    dense, and random routing biases; saved in folder."""
    settings = dict(num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=6,
                    qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=12, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                    topk_group=1, routed_scaling_factor=2.5, eos_token_id=None)
    model = hf_llama(folder, dtype=dtype, family="DeepseekV3", **{**settings, **kwargs})
    model.set_experts_implementation("eager")  # its default, grouped_mm, has no float64
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    return model


CONFIGS = [
    dict(),
    dict(q_lora_rank=7, n_group=1, topk_group=1, n_shared_experts=0),
    dict(n_shared_experts=2, first_k_dense_replace=0, rope_interleave=False, norm_topk_prob=False),
    dict(q_lora_rank=5, n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=2, num_hidden_layers=3,
         tie_word_embeddings=True),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_logits_equal_transformers_deepseek_v3(kwargs, tmp_path):
    """40 tokens past nothing: DeepSeek has no window; in float64 but for transformers' router, which
    scores in float32."""
    reference = hf_deepseek(tmp_path, max_position_embeddings=40, **kwargs).double()
    ours = DeepSeek.from_pretrained(tmp_path).double().eval()
    assert ours.config.q_lora_rank == kwargs.get("q_lora_rank")
    assert ours.config.n_shared_expert == kwargs.get("n_shared_experts", 1)
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
        logits, _ = ours(idx)
        cache = deepseek.KVCache(ours.config, 2, "cpu", torch.float64)
        cached = torch.cat([ours(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 40)]], 1)
    assert torch.allclose(logits, expected, atol=1e-4, rtol=0)
    assert torch.allclose(cached, expected, atol=1e-4, rtol=0)
    safetensors = pytest.importorskip("safetensors.torch")
    names = set(ours.state_dict())
    if ours.config.tie_embeddings:
        names.remove("lm_head.weight")  # stored once, as embed_tokens
    assert names == set(safetensors.load_file(tmp_path / "model.safetensors"))  # the same names


@pytest.mark.parametrize("kwargs", CONFIGS[:2])
def test_greedy_text_equals_transformers_generate_also_through_init_from(kwargs, tmp_path, capsys):
    """11 new tokens after 5, up to max_position_embeddings (16), with the latent cache and without."""
    reference = hf_deepseek(tmp_path, **kwargs).double()
    assert_greedy_ids_equal_generate(deepseek, DeepSeek, reference, tmp_path, capsys)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = reference.generate(prompt, max_new_tokens=11, do_sample=False, attention_mask=torch.ones_like(prompt))
    ours = DeepSeek.from_pretrained(tmp_path).double()
    assert torch.equal(ours.generate(prompt, 11, temperature=0, use_cache=False), expected)


def test_reads_bf16_safetensors_and_drops_the_multi_token_prediction_layer(tmp_path):
    hf_deepseek(tmp_path, dtype=torch.bfloat16)
    safetensors = pytest.importorskip("safetensors.torch")
    weights = safetensors.load_file(tmp_path / "model.safetensors")
    assert weights["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.bfloat16
    # A released DeepSeek-V3 stores its multi-token prediction module as one more layer.
    weights["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)
    safetensors.save_file(weights, tmp_path / "model.safetensors")
    edit_config(num_nextn_predict_layers=1, rope_interleave=False)(tmp_path)
    ours = DeepSeek.from_pretrained(tmp_path)
    for name, w in ours.state_dict().items():
        assert torch.equal(w, weights[name].float()), name


def test_init_from_trains_from_the_reference_weights(trained, corpus, tmp_path, capsys):
    model, reference = fine_tuned_from(deepseek, hf_deepseek, trained, corpus, tmp_path, capsys)
    assert model.config.n_expert == 4 and model.config.routed_scaling_factor == 2.5
    expected = reference.state_dict()
    for name, w in model.state_dict().items():
        # One step of bias update moved the biases by the speed, whatever the learning rate.
        atol = model.config.bias_update_speed + 1e-6 if "e_score_correction_bias" in name else 1e-6
        assert torch.allclose(w, expected[name], atol=atol), name


@pytest.mark.parametrize("spoil, key", [
    (edit_config(model_type="mixtral", architectures=["MixtralForCausalLM"]), "DeepseekV3ForCausalLM"),
    (edit_config(scoring_func="softmax"), "scoring_func"),
    (edit_config(rope_parameters={"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4}), "yarn"),
    (edit_config(num_key_value_heads=2), "num_key_value_heads"),
    (edit_config(n_group=3), "n_group"),
    (edit_config(n_routed_experts=6), "experts.4"),
    (edit_config(qk_rope_head_dim=2, qk_nope_head_dim=8), "weights do not fit"),
])
def test_a_bad_init_from_folder_gives_one_line(spoil, key, tmp_path, capsys):
    hf_deepseek(tmp_path)
    spoil(tmp_path)
    assert_init_from_refuses(deepseek, tmp_path, key, capsys)


def test_new_flags_reach_the_config(corpus, tmp_path, capsys):
    code, out, _ = run_main(deepseek, capsys, "train", "--data", corpus, "--out-dir", tmp_path, *TINY,
                            "--max-iters", 1, "--q-lora-rank", 6, "--kv-lora-rank", 5, "--n-expert", 6,
                            "--n-group", 3, "--topk-group", 2, "--norm-topk-prob", "false")
    assert code == 0 and "q_lora_rank=6, kv_lora_rank=5" in out and "norm_topk_prob=False" in out
    assert "n_expert=6" in out and "M active per token" in out
