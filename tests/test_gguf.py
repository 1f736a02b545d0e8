"""hf_to_gguf.py: an exported folder of every architecture as a GGUF file. Read back with
the `gguf` package: the metadata and tensors llama.cpp expects. Run by llama.cpp itself
(llama-cpp-python, optional: pip install llama-cpp-python, ~7 minutes to compile): its
tokenizer gives our ids, and its greedy tokens equal ours for 20 new tokens."""

import importlib
import json

import numpy as np
import pytest
import torch
from conftest import SENTENCES, one_line_error, randomize, run_cli
from test_models import TABLE

import bpe

gguf = pytest.importorskip("gguf")
import hf_to_gguf  # noqa: E402

# A window as long as the context; heads of 12, not 32 / 4, where a file has head_size (gemma, qwen3).
SHAPE = dict(block_size=64, n_layer=2, n_head=4, n_embd=32, sliding_window=64, head_size=12)
# name: model file, llama.cpp's architecture, settings beside SHAPE (gemma3.py with windows that cut, and a
# RoPE base of its own for its local layers; as Gemma 2, with soft-capping)
MODELS = {
    "gpt2": ("gpt2", "gpt2", {}),
    "llama": ("llama", "llama", {}),
    "mistral": ("mistral", "llama", {}),
    "mixtral": ("mixtral", "llama", {}),
    "gemma": ("gemma", "gemma", {}),
    "qwen3": ("qwen3", "qwen3", {}),
    "gemma3": ("gemma3", "gemma3", dict(n_layer=4, sliding_window=8, sliding_window_pattern=3, rope_local_theta=500.0,
                                        final_logit_softcapping=5.0)),
    "gemma3-all-local": ("gemma3", "gemma3", dict(sliding_window=8)),
    "gemma2": ("gemma3", "gemma2", dict(n_layer=4, sliding_window=8, sliding_window_pattern=2, qk_norm=False,
                                        attn_logit_softcapping=3.0, final_logit_softcapping=5.0, rope_local_theta=1e6)),
    "gpt_oss": ("gpt_oss", "gpt-oss", dict(n_layer=3, sliding_window=8, n_expert=4)),
    "deepseek": ("deepseek", "deepseek2", dict(n_layer=3, first_k_dense=1, q_lora_rank=24, n_expert=8,
                                               n_expert_per_token=2, n_group=2, topk_group=1)),
}
PROMPT = "Мой дядя самых честных правил"


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train(SENTENCES * 3, 400)


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, tok, tmp_path_factory):
    """(our model, the GGUF file, its architecture) of a random model of each file, exported and converted."""
    name, arch, settings = MODELS[request.param]
    model = randomize(TABLE[name].build(vocab_size=tok.vocab_size, **{**SHAPE, **settings}))
    folder = tmp_path_factory.mktemp(request.param)
    importlib.import_module(name).export(model, tok, folder / "hf")
    hf_to_gguf.convert(folder / "hf", folder / "model.gguf")
    return model, folder / "model.gguf", arch


def test_the_file_holds_what_llama_cpp_reads(converted, tok):
    model, path, expected_arch = converted
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == expected_arch
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data] == [tok.to_dict()["id2token"][str(i)]
                                                                       for i in range(tok.vocab_size)]
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.attn_norm.weight" in names
    if type(model).__name__ in ("Mixtral", "GptOss"):
        assert "blk.0.ffn_gate_exps.weight" in names
    if hasattr(model.config, "head_size"):
        assert reader.fields[f"{arch}.attention.key_length"].parts[-1][0] == model.config.head_size == 12
    if arch in ("qwen3", "gemma3"):
        assert "blk.0.attn_q_norm.weight" in names and "blk.0.attn_k_norm.weight" in names
    if arch in ("gemma2", "gemma3", "gpt-oss"):
        assert reader.fields[f"{arch}.attention.sliding_window"].parts[-1][0] == 8
    if arch in ("gemma2", "gemma3"):
        assert "blk.0.post_attention_norm.weight" in names and "blk.0.post_ffw_norm.weight" in names
    if arch == "gpt-oss":
        assert {"blk.2.attn_sinks.weight", "blk.0.ffn_up_exps.bias", "blk.0.attn_q.bias"} <= names
    if arch == "deepseek2":
        assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_shexp.weight",
                "blk.1.exp_probs_b.bias", "blk.1.attn_q_a.weight", "blk.1.attn_kv_a_mqa.weight",
                "blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"} <= names


def test_deepseek_rope_rows_turn_neighbours_as_released_weights_do(converted):
    """deepseek.py reads a released folder's rows with rope_halves: the GGUF's rows are those."""
    model, path, arch = converted
    if arch != "deepseek2":
        pytest.skip("DeepSeek-V3's RoPE rows only")
    import deepseek

    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(path).tensors}
    released = {"q_b_proj.weight": tensors["blk.1.attn_q_b.weight"],
                "kv_a_proj_with_mqa.weight": tensors["blk.1.attn_kv_a_mqa.weight"]}
    ours = deepseek.rope_halves(released, model.config)
    attention = model.model.layers[1].self_attn
    assert torch.equal(ours["q_b_proj.weight"], attention.q_b_proj.weight)
    assert torch.equal(ours["kv_a_proj_with_mqa.weight"], attention.kv_a_proj_with_mqa.weight)


def test_llama_cpp_tokenizes_and_generates_as_we_do(converted, tok):
    llama_cpp = pytest.importorskip("llama_cpp", reason="optional: pip install llama-cpp-python")
    model, path, _ = converted
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=SHAPE["block_size"], n_threads=1, logits_all=True,
                          verbose=False)
    ids = tok.encode_prompt(PROMPT)
    assert llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False) == ids
    expected = model.eval().generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
    llm.eval(ids)
    got = []
    for _ in range(20):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(got[-1:])
    assert got == expected


def test_a_window_llama_cpp_would_ignore_is_refused(tok, tmp_path):
    import mistral

    model = TABLE["mistral"].build(vocab_size=tok.vocab_size, **{**SHAPE, "sliding_window": 8})
    mistral.export(model, tok, tmp_path / "hf")
    result = run_cli("hf_to_gguf", tmp_path / "hf", tmp_path / "model.gguf")
    assert one_line_error(result.returncode, result.stderr, "sliding_window"), result.stderr
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize("settings, key", [
    (dict(query_pre_attn_scalar=20), "query_pre_attn_scalar"),  # llama.cpp scales by head_dim
    (dict(qk_norm=False, rope_local_theta=1e6, attn_logit_softcapping=3.0), "soft-caps"),  # gemma2 caps both
    (dict(qk_norm=False, rope_local_theta=1e6, sliding_window_pattern=3, attn_logit_softcapping=3.0,
          final_logit_softcapping=5.0, n_layer=3), "every second layer"),
])
def test_a_gemma_llama_cpp_would_compute_otherwise_is_refused(settings, key, tok, tmp_path):
    import gemma3

    model = TABLE["gemma3"].build(vocab_size=tok.vocab_size, **{**SHAPE, **settings})
    gemma3.export(model, tok, tmp_path / "hf")
    result = run_cli("hf_to_gguf", tmp_path / "hf", tmp_path / "model.gguf")
    assert one_line_error(result.returncode, result.stderr, key), result.stderr
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize("settings, key", [
    (dict(swiglu_limit=5.0), "swiglu_limit"),  # llama.cpp clamps at 7
    (dict(rope_scaling=dict(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                            truncate=False)), "RoPE scaling"),
])
def test_a_gpt_oss_llama_cpp_would_compute_otherwise_is_refused(settings, key, tok, tmp_path):
    import gpt_oss

    model = TABLE["gpt_oss"].build(vocab_size=tok.vocab_size, **{**SHAPE, **settings})
    gpt_oss.export(model, tok, tmp_path / "hf")
    result = run_cli("hf_to_gguf", tmp_path / "hf", tmp_path / "model.gguf")
    assert one_line_error(result.returncode, result.stderr, key), result.stderr


def test_a_deepseek_without_shared_experts_is_refused(tok, tmp_path):
    import deepseek

    model = TABLE["deepseek"].build(vocab_size=tok.vocab_size, **{**SHAPE, "n_shared_expert": 0})
    deepseek.export(model, tok, tmp_path / "hf")
    result = run_cli("hf_to_gguf", tmp_path / "hf", tmp_path / "model.gguf")
    assert one_line_error(result.returncode, result.stderr, "n_shared_experts 0"), result.stderr


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_files(tok, tmp_path, dtype):
    import llama

    llama.export(TABLE["llama"].build(vocab_size=tok.vocab_size, **SHAPE), tok, tmp_path / "hf")
    hf_to_gguf.convert(tmp_path / "hf", tmp_path / "model.gguf", dtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"


def test_without_the_gguf_package_one_line_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hf_to_gguf, "gguf", None)
    assert hf_to_gguf.main([str(tmp_path), str(tmp_path / "model.gguf")]) == 1
    assert one_line_error(1, capsys.readouterr().err, "pip install gguf")


def spoil_config(**changes):
    def spoil(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return spoil


def truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])


@pytest.mark.parametrize("spoil, key", [
    (spoil_config(hidden_size=None), "config.json"),
    (spoil_config(max_position_embeddings=None), "config.json"),
    (spoil_config(vocab_size=10), "does not fit"),
    (truncate_weights, "corrupt"),
])
def test_a_bad_folder_is_one_line(spoil, key, tok, tmp_path):
    import llama

    llama.export(TABLE["llama"].build(vocab_size=tok.vocab_size, **SHAPE), tok, tmp_path / "hf")
    spoil(tmp_path / "hf")
    result = run_cli("hf_to_gguf", tmp_path / "hf", tmp_path / "model.gguf")
    assert one_line_error(result.returncode, result.stderr, key), result.stderr


def test_the_file_is_never_written_into_the_folder_it_reads(tok, tmp_path):
    import llama

    llama.export(TABLE["llama"].build(vocab_size=tok.vocab_size, **SHAPE), tok, tmp_path / "hf")
    weights = (tmp_path / "hf" / "model.safetensors").read_bytes()
    result = run_cli("hf_to_gguf", tmp_path / "hf", tmp_path / "hf" / "model.safetensors")
    assert one_line_error(result.returncode, result.stderr, "inside"), result.stderr
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == weights
    result = run_cli("hf_to_gguf", tmp_path / "hf")
    assert one_line_error(result.returncode, result.stderr, "gguf_file"), result.stderr
