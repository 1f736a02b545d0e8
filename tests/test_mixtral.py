"""What only mixtral.py has: the sparse mixture of experts (router, top-k routing,
dispatch by expert), the load-balancing loss and its log, Hugging Face's
MixtralForCausalLM as the reference (loaded with --init-from), with a sliding window
shorter than the test sequences. What every model file must do is tested in
test_models.py; what mixtral.py shares with mistral.py's model (the sliding window,
the rolling cache) in test_mistral.py, and with llama.py's in test_llama.py."""

import csv
import shutil

import pytest
import torch
from conftest import TINY, randomize, run_main, train_args
from hypothesis import given, settings
from hypothesis import strategies as st
from test_llama import assert_init_from_refuses, edit_config, hf_llama

import bpe
import mixtral
from mixtral import Mixtral, MixtralConfig


def tiny(**kwargs):
    return MixtralConfig(**{**dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=16, n_kv_head=2,
                                   multiple_of=8, n_expert=4), **kwargs})


@pytest.mark.parametrize("kwargs, key", [
    (dict(n_expert=0), "n_expert"),
    (dict(n_expert_per_token=0), "n_expert_per_token"),
    (dict(n_expert=4, n_expert_per_token=5), "n_expert_per_token"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
])
def test_config_rejects_impossible_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        tiny(**kwargs)


def dense_reference(x, chosen, weights, experts):
    """Every expert on every token, times a weight that is zero for the experts not chosen."""
    dense = torch.zeros(x.size(0), len(experts), dtype=x.dtype).scatter(1, chosen, weights)  # (N, n_expert)
    return sum(dense[:, e, None] * expert(x) for e, expert in enumerate(experts))


def run_dispatch(x, chosen, weights, experts):
    """dispatch's output, and the rows each expert was given."""
    rows = []
    hooks = [expert.register_forward_hook(lambda module, args, out: rows.append(args[0])) for expert in experts]
    out = mixtral.dispatch(x, chosen, weights, experts)
    for hook in hooks:
        hook.remove()
    return out, rows


@settings(max_examples=40, deadline=None)
@given(n_tokens=st.integers(1, 40), half_embd=st.integers(1, 8), n_expert=st.integers(1, 8), data=st.data())
def test_dispatch_equals_every_expert_on_every_token(n_tokens, half_embd, n_expert, data):
    """Random shapes and routings, float64. Each expert also sees its own tokens only: N * k rows in all."""
    k = data.draw(st.integers(1, n_expert))
    config = tiny(n_embd=2 * half_embd, n_head=1, n_kv_head=1, n_expert=n_expert, n_expert_per_token=k)
    experts = randomize(mixtral.SparseMoE(config).double(), seed=data.draw(st.integers(0, 1000))).experts
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    x = torch.randn(n_tokens, config.n_embd, generator=generator, dtype=torch.float64)
    chosen = torch.rand(n_tokens, n_expert, generator=generator).argsort(dim=-1)[:, :k]  # k different experts
    weights = torch.rand(n_tokens, k, generator=generator, dtype=torch.float64).softmax(dim=-1)
    out, rows = run_dispatch(x, chosen, weights, experts)
    assert torch.allclose(out, dense_reference(x, chosen, weights, experts), atol=1e-12)
    assert [len(part) for part in rows] == chosen.flatten().bincount(minlength=n_expert).tolist()


def test_dispatch_pads_an_experts_tokens_past_64_with_zero_rows_to_a_multiple_of_64():
    """So that the CPU's bfloat16 matmuls meet few shapes (each new one compiles a kernel)."""
    experts = randomize(mixtral.SparseMoE(tiny(n_expert=4, n_expert_per_token=1)).double()).experts
    chosen = torch.tensor([0] * 64 + [1] * 65 + [2] * 130 + [3] * 5)[torch.randperm(264), None]
    x, weights = torch.randn(264, 16, dtype=torch.float64), torch.rand(264, 1, dtype=torch.float64)
    out, rows = run_dispatch(x, chosen, weights, experts)
    assert torch.allclose(out, dense_reference(x, chosen, weights, experts), atol=1e-12)
    assert [len(part) for part in rows] == [64, 128, 192, 5]
    assert rows[1][65:].count_nonzero() == rows[2][130:].count_nonzero() == 0


def test_routing_takes_the_top_k_and_a_softmax_over_them():
    """The chosen experts' weights are the router's softmax over all experts, renormalised over the chosen."""
    moe = randomize(mixtral.SparseMoE(tiny(n_expert=6, n_expert_per_token=3)).double(), std=0.5)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, router_logits = moe(x)
    probs = router_logits.softmax(dim=-1)  # (10, 6)
    top = probs.topk(3, dim=-1)
    weights = top.values / top.values.sum(dim=-1, keepdim=True)
    assert out.shape == x.shape and router_logits.shape == (10, 6)
    assert torch.allclose(out.view(10, 16), dense_reference(x.view(10, 16), top.indices, weights, moe.experts),
                          atol=1e-12)
    with torch.autocast("cpu", torch.bfloat16):  # the router is float32 under bfloat16 autocast, the experts not
        assert moe.float()(x.float())[1].dtype == torch.float32


def test_load_balancing_loss_is_switch_transformers():
    """n_expert * sum_i f_i P_i: at least k; k for an even spread; n_expert * k when all go to the same experts."""
    logits = torch.randn(3, 50, 4, dtype=torch.float64)  # (n_layer, N, n_expert)
    loss, share = mixtral.load_balancing_loss(logits, 2)
    probs, chosen = logits.softmax(-1), logits.topk(2, dim=-1).indices
    f = torch.stack([(chosen == i).any(-1).double().mean() for i in range(4)])  # over all layers' tokens
    assert loss.item() == pytest.approx(4 * (f * probs.mean(dim=(0, 1))).sum().item())
    assert share.shape == (3, 4) and torch.allclose(share.sum(-1), torch.ones(3, dtype=torch.float64))
    even = torch.tensor([[[0.0, 0.0, -50, -50], [-50, -50, 0.0, 0.0]]]).repeat(1, 10, 1)  # half to 0, 1; half to 2, 3
    assert mixtral.load_balancing_loss(even, 2)[0].item() == pytest.approx(2.0)
    collapsed = torch.tensor([[[50.0, 50, 0, 0]]]).repeat(1, 20, 1)
    assert mixtral.load_balancing_loss(collapsed, 2)[0].item() == pytest.approx(4.0)
    assert mixtral.load_balancing_loss(collapsed, 2)[1].tolist() == [[0.5, 0.5, 0.0, 0.0]]


def test_forward_adds_the_scaled_aux_loss_and_keeps_it():
    model = randomize(Mixtral(tiny(router_aux_loss_coef=0.5)))
    idx = torch.randint(0, 40, (2, 12))
    logits, loss = model(idx, targets=idx)
    cross_entropy = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert model.aux_loss.dim() == 0 and model.aux_loss.item() >= 2 - 1e-6  # k = 2
    assert loss.item() == pytest.approx(cross_entropy.item() + 0.5 * model.aux_loss.item())
    assert model.expert_share.shape == (2, 4)
    assert model.balance().tolist() == pytest.approx(
        [model.aux_loss.item(), model.expert_share.min().item(), model.expert_share.max().item()])


def test_active_parameters_are_those_of_a_model_with_k_experts_and_the_full_router():
    sparse, dense = Mixtral(tiny(n_expert=8, n_expert_per_token=2)), Mixtral(tiny(n_expert=2, n_expert_per_token=2))
    assert sparse.num_params(active=True) == dense.num_params() + 2 * 6 * 16  # 2 layers, 6 more router rows
    assert sparse.num_params() - dense.num_params() == 2 * 6 * (3 * 16 * 24 + 16)  # 6 more experts and rows a layer
    assert dense.num_params(active=True) == dense.num_params()


def test_the_balance_loss_spreads_the_tokens_over_the_experts(trained, corpus, tmp_path, capsys):
    """A short run with the default coefficient and one with 0, on the same batches: with the
    loss, the gap between the largest and the smallest expert share (log.csv) is smaller.
    The direction only; without the loss the router sends most tokens to a few experts."""
    gaps = {}
    for coef in (MixtralConfig().router_aux_loss_coef, 0.0):
        out_dir = tmp_path / str(coef)
        out_dir.mkdir()
        shutil.copy(trained("mixtral") / "tokenizer.json", out_dir)
        code, out, _ = run_main(mixtral, capsys, *train_args(corpus, out_dir, "--n-expert", 4, "--max-iters", 40,
                                                             "--eval-interval", 4, "--router-aux-loss-coef", coef))
        assert code == 0 and "balance: aux loss" in out and "expert shares" in out
        rows = list(csv.DictReader((out_dir / "log.csv").open()))[5:]  # from step 24 on
        gaps[coef] = sum(float(r["max_expert_share"]) - float(r["min_expert_share"]) for r in rows) / len(rows)
    assert gaps[MixtralConfig().router_aux_loss_coef] < gaps[0.0]


# -----------------------------------------------------------------------------
# Hugging Face's Mixtral as the reference


def hf_mixtral(folder, dtype=None, **kwargs):
    """test_llama's random small model as a MixtralForCausalLM, 4 experts, top 2, saved in folder; its window,
    5, shorter than the test sequences; no end-of-text token, so that generate goes on to the end."""
    settings = dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=5,
                    eos_token_id=None)
    model = hf_llama(folder, dtype=dtype, family="Mixtral", **{**settings, **kwargs})
    model.set_experts_implementation("eager")  # its default, grouped_mm, has no float64
    return model


def routing_margin(model, idx):
    """The smallest gap, over all layers and tokens, between the k-th and the (k+1)-th router logit."""
    margins = []
    hooks = [block.block_sparse_moe.gate.register_forward_hook(
        lambda module, args, logits: margins.append(logits.sort(dim=-1, descending=True).values.diff(dim=-1)))
        for block in model.model.layers]
    model(idx)
    for hook in hooks:
        hook.remove()
    k, n_expert = model.config.n_expert_per_token, model.config.n_expert
    return min(-m[:, k - 1].min().item() for m in margins) if k < n_expert else float("inf")


@pytest.mark.parametrize("kwargs", [dict(num_local_experts=4, num_experts_per_tok=2),
                                    dict(num_local_experts=8, num_experts_per_tok=2, output_router_logits=True),
                                    dict(num_local_experts=3, num_experts_per_tok=1, sliding_window=3),
                                    dict(num_local_experts=2, num_experts_per_tok=2, num_key_value_heads=1)])
def test_logits_loss_and_aux_loss_equal_transformers_mixtral(kwargs, tmp_path):
    """40 tokens, past the window and max_position_embeddings (16). In float64, on inputs whose routing
    margins are clear (checked): transformers routes on float32 probabilities, and a near-tie between
    two experts could flip between its model and ours."""
    reference = hf_mixtral(tmp_path, **kwargs).double()
    ours = Mixtral.from_pretrained(tmp_path).double().eval()
    assert (ours.config.n_expert, ours.config.n_expert_per_token) == (kwargs["num_local_experts"],
                                                                      kwargs["num_experts_per_tok"])
    assert ours.config.router_aux_loss_coef == 0.02 and ours.config.sliding_window == reference.config.sliding_window
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    assert routing_margin(ours, idx) > 1e-4
    with torch.no_grad():
        expected = reference(idx, labels=idx, output_router_logits=True)
        # transformers shifts the labels inside; the last position has no target (-100 is ignored)
        logits, loss = ours(idx, targets=torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1))
    assert torch.allclose(logits, expected.logits, atol=1e-4, rtol=0)
    assert abs(ours.aux_loss.item() - expected.aux_loss.item()) < 1e-4
    assert abs(loss.item() - expected.loss.item()) < 1e-4  # cross-entropy + 0.02 * aux_loss
    safetensors = pytest.importorskip("safetensors.torch")
    assert set(ours.state_dict()) == set(safetensors.load_file(tmp_path / "model.safetensors"))  # a plain copy


@pytest.mark.parametrize("kwargs", [dict(num_local_experts=4, num_experts_per_tok=2),
                                    dict(num_local_experts=8, num_experts_per_tok=1, num_key_value_heads=1)])
def test_greedy_text_equals_transformers_generate_past_the_window(kwargs, tmp_path):
    """30 new tokens after 5, past the window of 5 and max_position_embeddings of 16, in float64 (see
    above), with the rolling cache and without."""
    reference = hf_mixtral(tmp_path, **kwargs).double()
    ours = Mixtral.from_pretrained(tmp_path).double().eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = reference.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert expected.size(1) == 35 and torch.equal(ours.generate(prompt, 30, temperature=0), expected)
    assert torch.equal(ours.generate(prompt, 30, temperature=0, use_cache=False), expected)


def test_reads_bf16_safetensors(tmp_path):
    reference = hf_mixtral(tmp_path, dtype=torch.bfloat16)
    ours = Mixtral.from_pretrained(tmp_path)
    weights = pytest.importorskip("safetensors.torch").load_file(tmp_path / "model.safetensors")
    assert weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"].dtype == torch.bfloat16
    for name, w in weights.items():
        assert torch.equal(ours.state_dict()[name], w.float()), name
    assert ours.config.n_expert == reference.config.num_local_experts


def fine_tuned_from(module, build, trained, corpus, tmp_path, capsys):
    """One step at lr 1e-9 of `train --init-from` a random Hugging Face folder that build writes, with the
    tokenizer of module's trained run: the run's model, and the folder's (from_pretrained)."""
    out_dir = shutil.copytree(trained(module.__name__), tmp_path / "run", ignore=shutil.ignore_patterns("ckpt.pt"))
    tok = bpe.Tokenizer.load(out_dir / "tokenizer.json")
    build(tmp_path / "hf", vocab_size=tok.vocab_size, max_position_embeddings=64)
    tok.save_pretrained(tmp_path / "hf")  # as export writes it
    code, _, err = run_main(module, capsys, *train_args(corpus, out_dir, "--init-from", tmp_path / "hf",
                                                        "--max-iters", 1, "--lr", "1e-9"))
    assert code == 0, err
    model = module.load_trained(out_dir, torch.device("cpu"))[0]
    return model, type(model).from_pretrained(tmp_path / "hf")


def test_init_from_trains_from_the_reference_weights(trained, corpus, tmp_path, capsys):
    model, reference = fine_tuned_from(mixtral, hf_mixtral, trained, corpus, tmp_path, capsys)
    assert model.config.n_expert == 4 and model.config.router_aux_loss_coef == 0.02
    expected = reference.state_dict()
    assert all(torch.allclose(w, expected[name], atol=1e-6) for name, w in model.state_dict().items())


@pytest.mark.parametrize("spoil, key", [
    (edit_config(model_type="mistral", architectures=["MistralForCausalLM"]), "MixtralForCausalLM"),
    (edit_config(sliding_window=0), "sliding_window"),
    (edit_config(router_jitter_noise=0.1), "router_jitter_noise"),
    (edit_config(num_experts_per_tok=5), "n_expert_per_token"),
    (edit_config(num_local_experts=5), "experts.4"),
])
def test_a_bad_init_from_folder_gives_one_line(spoil, key, tmp_path, capsys):
    hf_mixtral(tmp_path)
    spoil(tmp_path)
    assert_init_from_refuses(mixtral, tmp_path, key, capsys)


def test_new_flags_reach_the_config(corpus, tmp_path, capsys):
    code, out, _ = run_main(mixtral, capsys, "train", "--data", corpus, "--out-dir", tmp_path, *TINY, "--max-iters", 1,
                            "--n-expert", 3, "--n-expert-per-token", 1, "--router-aux-loss-coef", 0.5)
    assert code == 0 and "n_expert=3, n_expert_per_token=1, router_aux_loss_coef=0.5" in out
    assert "M active per token" in out
