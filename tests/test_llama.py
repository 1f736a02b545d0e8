"""What only llama.py has: RMSNorm, SwiGLU, RoPE, grouped-query attention, an
untied head, Hugging Face's LlamaForCausalLM as the reference (loaded with
--init-from), and the command line's --init-from (with the folder's tokenizer) and
--prompt-ids.
What every model file must do is tested in test_models.py."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import one_line_error, randomize, run_cli, run_main, train_args
from hypothesis import given, settings
from hypothesis import strategies as st

import bpe
import llama
from llama import Llama, LlamaConfig


def tiny(**kwargs):
    return LlamaConfig(**{**dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=16, n_kv_head=2,
                                 multiple_of=8), **kwargs})


@pytest.mark.parametrize("kwargs, key", [
    (dict(n_embd=24, n_head=8), "even"),
    (dict(n_head=8, n_kv_head=3), "n_kv_head"),
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(multiple_of=0), "multiple_of"),
    (dict(mlp_hidden=-5), "mlp_hidden"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=1.0), "rope_theta"),
    (dict(rope_theta=float("inf")), "rope_theta"),
])
def test_config_rejects_impossible_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LlamaConfig(**kwargs)


def test_mlp_hidden_is_two_thirds_of_4_n_embd_rounded_up():
    assert LlamaConfig(n_embd=4096, n_head=32, multiple_of=256).mlp_hidden == 11008  # LLaMA-7B
    assert LlamaConfig(n_embd=256, multiple_of=64).mlp_hidden == 704
    assert LlamaConfig(n_embd=256, mlp_hidden=100).mlp_hidden == 100


def test_rmsnorm_divides_by_the_root_mean_square_only():
    norm = llama.RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6, dtype=torch.float64) * 5 + 3
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0)
    assert torch.allclose(norm(x.float()).double(), expected, atol=1e-5)
    assert not torch.allclose(norm(x.float()), norm(x.float() + 1.0), atol=1e-3)  # no mean subtraction
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # no bias


def test_silu():
    x = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    assert torch.allclose(llama.silu(x), F.silu(x), atol=1e-12)
    assert not torch.allclose(llama.silu(x), F.gelu(x), atol=1e-3)


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


def test_initialisation_and_the_untied_head(corpus, tmp_path, capsys):
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
    assert run_main(llama, capsys, *train_args(corpus, tmp_path, "--max-iters", 1, "--tie-embeddings"))[0] == 0
    model = llama.load_trained(tmp_path, torch.device("cpu"))[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def hf_llama(folder, seed=0, dtype=None, family="Llama", **kwargs):
    """A random small transformers LlamaForCausalLM (or another family's, such as Mistral's) with weights
    far from its init, saved in folder with save_pretrained; returns the model."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()  # its progress bars would go to the stderr tests read
    torch.manual_seed(seed)
    settings = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6, rope_theta=500.0)
    config = getattr(transformers, f"{family}Config")(**{**settings, **kwargs})
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
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


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)


def test_llama3_rope_scaling_equals_transformers(tmp_path):
    """Head size 8 at rope_theta 500: wavelengths 6, 30, 140 and 660 positions, so against a context
    of 64 one pair keeps its speed, one is on the ramp and two are slowed 8 times."""
    reference = hf_llama(tmp_path, rope_parameters=LLAMA3_ROPE)
    ours = Llama.from_pretrained(tmp_path).eval()
    assert ours.config.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    inv_freq = 500.0 ** -(torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    kept = llama.llama3_scaling(inv_freq, **ours.config.rope_scaling) / inv_freq
    assert kept[0] == 1 and 1 / 8 < kept[1] < 1 and torch.equal(kept[2:], torch.full((2,), 1 / 8, dtype=torch.float64))
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
    assert torch.allclose(ours(idx)[0], expected, atol=1e-4, rtol=0)
    unscaled = Llama(replace(ours.config, rope_scaling=None))
    unscaled.load_state_dict(ours.state_dict())
    assert not torch.allclose(unscaled(idx)[0], expected, atol=1e-2)  # the scaling is what makes them equal


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
    config = folder / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())  # saved by Notepad: a byte order mark first
    ours = Llama.from_pretrained(folder)
    assert all(torch.equal(ours.state_dict()[name], w) for name, w in reference.state_dict().items())


def test_init_from_samples_ids_and_scores_with_the_folders_tokenizer(trained, corpus, tmp_path, capsys):
    tokenizer = trained("llama") / "tokenizer.json"
    vocab_size = bpe.Tokenizer.load(tokenizer).vocab_size  # a model that knows the ids of our tokenizer
    reference = hf_llama(tmp_path / "hf", vocab_size=vocab_size)
    code, out, _ = run_main(llama, capsys, "sample", "--init-from", tmp_path / "hf", "--prompt-ids", 3, 1, 4,
                            "--max-new-tokens", 10, "--temperature", 0, "--device", "cpu")
    expected = Llama.from_pretrained(tmp_path / "hf").eval().generate(torch.tensor([[3, 1, 4]]), 10, temperature=0)
    assert code == 0 and out.split() == [str(id) for id in expected[0].tolist()]

    bpe.Tokenizer.load(tokenizer).save_pretrained(tmp_path / "hf")  # the folder's tokenizer, as export writes it
    code, out, _ = run_main(llama, capsys, "sample", "--init-from", tmp_path / "hf",
                            "--prompt", "Мой дядя", "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0 and out.startswith("Мой дядя")
    code, out, _ = run_main(llama, capsys, "eval", "--init-from", tmp_path / "hf", "--data", corpus, "--device", "cpu")
    assert code == 0 and "validation split" in out and "bits per character" in out

    out_dir = tmp_path / "finetuned"  # train --init-from: its shape and weights, then our steps
    code, out, err = run_main(llama, capsys, *train_args(corpus, out_dir, "--init-from", tmp_path / "hf",
                                                         "--max-iters", 1, "--lr", "1e-9"))
    assert code == 0, err
    model = llama.load_trained(out_dir, torch.device("cpu"))[0]
    assert model.config.vocab_size == vocab_size and model.config.rope_theta == 500.0
    assert torch.allclose(model.lm_head.weight, reference.lm_head.weight, atol=1e-6)


def hf_into_run(run):
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


def assert_init_from_refuses(module, folder, key, capsys):
    """`sample --init-from folder` ends in one line on stderr that names key, exit 1."""
    code, _, err = run_main(module, capsys, "sample", "--init-from", folder, "--prompt-ids", "1", "--device", "cpu")
    assert one_line_error(code, err, key), err


def assert_greedy_ids_equal_generate(module, model_class, reference, folder, capsys):
    """After the prompt 3 1 4 1 5, transformers' greedy generate of `reference` (saved in folder) gives the 11
    ids that model_class.from_pretrained(folder) generates in float64, and that `sample --init-from folder
    --prompt-ids` prints."""
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = reference.generate(prompt, max_new_tokens=11, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(model_class.from_pretrained(folder).double().generate(prompt, 11, temperature=0), expected)
    code, out, _ = run_main(module, capsys, "sample", "--init-from", folder, "--prompt-ids", 3, 1, 4, 1, 5,
                            "--max-new-tokens", 11, "--temperature", 0, "--device", "cpu")
    assert code == 0 and out.split() == [str(id) for id in expected[0].tolist()]


def no_weights(folder):
    (folder / "model.safetensors").unlink()


def truncated_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def shards(folder, weight_map=None):
    """The folder's weights as a large model's: two shards and the index that names them (or
    weight_map in its place)."""
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    files = {}
    for i, part in enumerate([names[::2], names[1::2]], 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        safetensors.torch.save_file({name: weights[name] for name in part}, folder / shard)
        files |= dict.fromkeys(part, shard)
    index = {"metadata": {}, "weight_map": files if weight_map is None else weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def a_missing_shard(folder):
    shards(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()


def bin_of(content):
    def spoil(folder):
        (folder / "model.safetensors").unlink()
        torch.save(content, folder / "pytorch_model.bin")
    return spoil


def garbage_config(folder):
    (folder / "config.json").write_text("{not json")


@pytest.mark.parametrize("spoil, key", [
    (edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "LlamaForCausalLM"),
    (edit_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE"),
    (edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "RoPE"),
    (edit_config(attention_bias=True), "bias"),
    (edit_config(num_key_value_heads=3), "n_kv_head"),
    (edit_config(intermediate_size=48), "config.json"),
    (edit_config(num_hidden_layers=3), "model.layers.2"),
    (garbage_config, "JSON"),
    (no_weights, "model.safetensors"),
    (truncated_weights, "corrupt"),
    (a_missing_shard, "lacks the shard model-00002-of-00002.safetensors"),
    (lambda folder: shards(folder, weight_map=["model-00001-of-00002.safetensors"]), "weight_map"),
    (lambda folder: shards(folder, weight_map={"lm_head.weight": 1}), "lacks the shard 1"),
    (bin_of([("lm_head.weight", torch.zeros(2))]), "not a state dict"),
    (bin_of(torch.zeros(3, 2)), "not a state dict"),
])
def test_a_bad_init_from_folder_gives_one_line(spoil, key, tmp_path, capsys):
    assert_init_from_refuses(llama, hf_folder(tmp_path, spoil), key, capsys)


def test_shards_load_as_their_index_names_them(tmp_path):
    folder = tmp_path / "hf"
    hf_llama(folder)
    whole = llama.Llama.from_pretrained(folder).state_dict()
    shards(folder)
    sharded = llama.Llama.from_pretrained(folder).state_dict()
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)


NEW = ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new"]


@pytest.mark.parametrize("spoil, argv, key", [
    (None, [*NEW, "--n-kv-head", "3"], "n_kv_head"),
    (None, [*NEW, "--init-from", "{tmp}/nowhere"], "config.json"),
    (hf_into_run, [*NEW, "--init-from", "{run}/hf"], "tokenizer"),
    (hf_into_run, ["eval", "--init-from", "{run}/hf"], "no tokenizer"),
    (None, ["sample", "--init-from", "{tmp}", "--prompt-ids", "1"], "config.json"),
    (hf_into_run, ["sample", "--init-from", "{run}/hf", "--prompt", "текст"], "--prompt-ids"),
    (None, ["sample", "--out-dir", "{run}", "--tokenizer", "{run}/tokenizer.json"], "--tokenizer"),
    (None, ["sample", "--out-dir", "{run}", "--prompt-ids", "100000"], "--prompt-ids"),
    (None, ["sample", "--out-dir", "{run}", "--prompt", "a", "--prompt-ids", "1"], "--prompt"),
])
def test_bad_input_gives_one_line_and_exit_1(spoil, argv, key, trained, corpus, tmp_path, capsys):
    run = shutil.copytree(trained("llama"), tmp_path / "copy")
    if spoil:
        spoil(run)
    code, _, err = run_main(llama, capsys, *[a.format(tmp=tmp_path, run=run, corpus=corpus) for a in argv])
    assert one_line_error(code, err, key), err


def test_bad_init_from_from_the_shell_has_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    result = run_cli("llama", "sample", "--init-from", tmp_path, "--prompt-ids", "1")
    assert one_line_error(result.returncode, result.stderr, "num_attention_heads"), result.stderr
