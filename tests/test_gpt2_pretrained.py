"""Tests for gpt2.py with Hugging Face's GPT-2 format: loading GPT2LMHeadModel
folders (safetensors and pytorch_model.bin; float32, float16, bfloat16 and float64),
logits and greedy generation equal to transformers', export and round trip, bpe.py's
reading of GPT-2's tokenizer files, fine-tuning with --init-from, and bad folders.

These machines cannot download OpenAI's weights, so the reference models are small
random GPT2LMHeadModels of several shapes, made here; the tokenizer is trained here
with the `tokenizers` package's byte-level BPE. transformers is a test-only
dependency (requirements-dev.txt): without it, these tests are skipped.
"""

import json

import pytest
import torch
from conftest import one_line_error, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402

import bpe  # noqa: E402
import gpt2  # noqa: E402
from gpt2 import GPT  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

transformers.utils.logging.disable_progress_bar()


# Shapes of the reference models: a small context, several depths and widths,
# different LayerNorm epsilons, both names of the tanh GELU.
SHAPES = {
    "small-context": dict(vocab_size=300, n_positions=8, n_embd=32, n_layer=2, n_head=2, layer_norm_epsilon=1e-5),
    "deep": dict(vocab_size=257, n_positions=24, n_embd=48, n_layer=3, n_head=4, layer_norm_epsilon=1e-3),
    "wide": dict(vocab_size=500, n_positions=40, n_embd=64, n_layer=1, n_head=8, layer_norm_epsilon=1e-6,
                 activation_function="gelu_pytorch_tanh"),
}


def reference_model(shape, seed=0, std=0.1):
    """A random GPT2LMHeadModel, weights far enough from the init's 0.02 that
    attention is sharp and a wrong transpose or mask shows clearly."""
    torch.manual_seed(seed)
    # No end-of-text token: transformers' generate would stop at it.
    model = GPT2LMHeadModel(GPT2Config(**SHAPES[shape], bos_token_id=None, eos_token_id=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "ln_" in name and name.endswith(".weight")  # LayerNorm gains around 1, not 0
            p.copy_(torch.randn(p.shape) * std + (1.0 if gain else 0.0))
    return model.eval()


def save_openai_bin(model, folder):
    """pytorch_model.bin as OpenAI's GPT-2 on the Hugging Face hub has it: no
    "transformer." prefix, and the causal-mask buffers attn.bias and attn.masked_bias."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    n = model.config.n_positions
    weights = {name.removeprefix("transformer."): w for name, w in model.state_dict().items()}
    for layer in range(model.config.n_layer):
        weights[f"h.{layer}.attn.bias"] = torch.ones(n, n).tril().view(1, 1, n, n)
        weights[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(weights, folder / "pytorch_model.bin")


def save(model, folder, fmt):
    if fmt == "safetensors":
        model.save_pretrained(folder)
    else:
        save_openai_bin(model, folder)
    return folder


def random_tokens(vocab_size, length, batch=2, seed=0):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Loading: the same logits, the same greedy tokens


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_equal_transformers(shape, fmt, tmp_path):
    theirs = reference_model(shape)
    ours = GPT.from_pretrained(save(theirs, tmp_path / shape, fmt))
    n = theirs.config.n_positions
    for length in sorted({1, 2, n // 2, n - 1, n}):
        idx = random_tokens(theirs.config.vocab_size, length, seed=length)
        with torch.no_grad():
            expected = theirs(idx).logits
            logits, _ = ours(idx)
        assert expected.abs().max() > 1  # logits of some size: a near-zero model would prove little
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype, name", [(torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.float64, "F64")])
def test_weights_of_other_precisions_load_as_float32(dtype, name, tmp_path):
    theirs = reference_model("deep")
    theirs.to(dtype).save_pretrained(tmp_path)
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:][: int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")])
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {name}
    theirs.float()  # the same rounded weights, computed in float32
    ours = GPT.from_pretrained(tmp_path)
    assert ours.lm_head.weight.dtype == torch.float32
    idx = random_tokens(theirs.config.vocab_size, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_equals_transformers(shape, use_cache, tmp_path):
    """In float64, where a near-tie between the two best tokens cannot be decided
    differently by two correct implementations' rounding."""
    theirs = reference_model(shape, seed=1)
    ours = GPT.from_pretrained(save(theirs, tmp_path, "safetensors")).double()
    theirs.double()
    n = theirs.config.n_positions
    for prompt_length in (1, 3):
        idx = random_tokens(theirs.config.vocab_size, prompt_length, batch=1, seed=prompt_length)
        new_tokens = n - prompt_length  # up to the context: transformers' GPT-2 stops there
        expected = theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)
        got = ours.generate(idx, new_tokens, temperature=0, use_cache=use_cache)
        assert got.tolist() == expected.tolist()


# -----------------------------------------------------------------------------
# Export: transformers reads what we write, and so do we


def random_gpt(config, seed=0):
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    tok = bpe.Tokenizer.train([RUSSIAN] * 3, 300)
    config = gpt2.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, norm_eps=1e-4)
    ours = random_gpt(config)
    gpt2.export(ours, tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                          "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    theirs, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights, no errors
    assert theirs.config.layer_norm_epsilon == 1e-4 and theirs.config.eos_token_id == tok.eot_id
    idx = random_tokens(config.vocab_size, config.block_size)
    with torch.no_grad():
        expected, _ = ours(idx)
        torch.testing.assert_close(theirs.eval()(idx).logits, expected, atol=1e-4, rtol=0)
        back = GPT.from_pretrained(tmp_path)
        assert torch.equal(back(idx)[0], expected)  # our own round trip is exact
    hf_tok = GPT2TokenizerFast.from_pretrained(tmp_path)  # its tokenizer.json: <|endoftext|> first, as in training
    assert hf_tok.encode(RUSSIAN) == tok.encode_prompt(RUSSIAN)
    assert bpe.Tokenizer.from_pretrained(tmp_path).encode(RUSSIAN) == tok.encode(RUSSIAN)


def test_cli_export_of_a_checkpoint(tmp_path, capsys):
    tok = bpe.Tokenizer.train([RUSSIAN] * 3, 280)
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    model = random_gpt(gpt2.GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    cfg = gpt2.TrainConfig(out_dir=str(run))
    optimizer = gpt2.configure_optimizer(model, cfg, torch.device("cpu"))
    gpt2.save_checkpoint(run / "ckpt.pt", gpt2.Run(model, optimizer, tok, torch.Generator(), step=3))
    assert gpt2.main(["export", "--out-dir", str(run)]) == 0
    assert "wrote" in capsys.readouterr().out
    theirs = GPT2LMHeadModel.from_pretrained(run / "hf")
    idx = random_tokens(tok.vocab_size, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(idx).logits, model(idx)[0], atol=1e-4, rtol=0)


# -----------------------------------------------------------------------------
# The tokenizer: GPT-2's files, read by bpe.py, encode as transformers does

RUSSIAN = ("Мой дядя самых честных правил, когда не в шутку занемог, он уважать себя заставил и лучше "
           "выдумать не мог. — Что же вы молчите? — спросила она. It's 1833: we'll see, they're here, "
           "I'd say ВСЁ ёлки-палки 12345 3.14 ... 日本語のテキスト, emoji 🙂🙂 and\ttabs\n\n  spaces   end ")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A GPT-2-format vocab.json + merges.txt trained by the `tokenizers` package:
    its ids are numbered its own way (<|endoftext|> first), not like bpe.py's."""
    folder = tmp_path_factory.mktemp("tokenizer")
    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator([RUSSIAN] * 20, vocab_size=420, min_frequency=1, special_tokens=[bpe.EOT],
                                show_progress=False)
    trainer.save_model(str(folder))
    return folder


WORDS = RUSSIAN.split(" ") + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", " ", "  ", "\n", "\r\n", "\t", "Ё", "ё"]
texts = st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=4)), max_size=25).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_tokenizer_encodes_like_transformers(tokenizer_dir, text):
    ours = bpe.Tokenizer.from_pretrained(tokenizer_dir)
    theirs = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == text


def test_pretrained_tokenizer_survives_tokenizer_json_and_save_pretrained(tokenizer_dir, tmp_path):
    """A fine-tuned run stores GPT-2's tokenizer as tokenizer.json; export writes
    vocab.json + merges.txt again: both must keep every id."""
    tok = bpe.Tokenizer.from_pretrained(tokenizer_dir)
    tok.save(tmp_path / "tokenizer.json")
    loaded = bpe.Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.fingerprint == tok.fingerprint and loaded.eot_id == tok.eot_id == 0
    assert loaded.encode(RUSSIAN) == tok.encode(RUSSIAN)
    loaded.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text("utf-8")) == \
        json.loads((tokenizer_dir / "vocab.json").read_text("utf-8"))
    assert (tmp_path / "merges.txt").read_text("utf-8").splitlines()[1:] == \
        (tokenizer_dir / "merges.txt").read_text("utf-8").splitlines()[1:]


# -----------------------------------------------------------------------------
# The command line: sample, eval and train --init-from


@pytest.fixture(scope="module")
def pretrained(tokenizer_dir, tmp_path_factory):
    """A Hugging Face folder with a random model and the trained tokenizer."""
    folder = tmp_path_factory.mktemp("pretrained")
    vocab_size = len(json.loads((tokenizer_dir / "vocab.json").read_text("utf-8")))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


def test_sample_init_from_uses_the_folders_model_and_tokenizer(pretrained, capsys):
    prompt = "Мой дядя"
    code, out, err = run_main(gpt2, capsys, "sample", "--init-from", pretrained, "--prompt", prompt, "--temperature",
                              "0", "--max-new-tokens", "10", "--device", "cpu")
    tok = bpe.Tokenizer.from_pretrained(pretrained)
    idx = torch.tensor([tok.encode(prompt)])  # as AutoTokenizer: GPT-2 puts nothing before a prompt
    expected = GPT.from_pretrained(pretrained).generate(idx, 10, temperature=0)[0, idx.size(1):].tolist()
    shown = expected[: expected.index(tok.eos_id)] if tok.eos_id in expected else expected  # up to <|endoftext|>
    assert code == 0 and out == prompt + tok.decode(shown) + "\n"
    assert err.startswith(f"{min(len(shown) + 1, 10)} tokens in")


def test_eval_init_from_scores_the_validation_split(pretrained, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"Author_Novel{i}.txt").write_text(RUSSIAN * (i + 1), encoding="utf-8")
    code, out, _ = run_main(gpt2, capsys, "eval", "--init-from", pretrained, "--data", corpus, "--out-dir",
                            tmp_path / "unused", "--device", "cpu")
    tok = bpe.Tokenizer.from_pretrained(pretrained)  # the held-out novel, in the folder's tokens
    (_, held_out), = bpe.split_corpus(bpe.read_corpus(corpus))[1]
    n_tokens = len(tok.encode(held_out)) - 1  # GPT-2 puts nothing before a text: the first is not predicted
    assert code == 0 and "bits per character" in out and f"({n_tokens:,} tokens)" in out


def test_train_init_from_fine_tunes_the_pretrained_weights(pretrained, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"Author_Novel{i}.txt").write_text(RUSSIAN * (i + 2), encoding="utf-8")
    run = tmp_path / "run"
    code, _, err = run_main(gpt2, capsys, "train", "--init-from", pretrained, "--data", corpus, "--out-dir", run,
                            "--max-iters", "1", "--batch-size", "2", "--eval-iters", "1", "--warmup-iters", "1",
                            "--lr", "1e-9", "--device", "cpu")
    assert code == 0, err
    tok = bpe.Tokenizer.load(run / "tokenizer.json")
    assert tok.fingerprint == bpe.Tokenizer.from_pretrained(pretrained).fingerprint
    checkpoint = torch.load(run / "ckpt.pt", weights_only=True)
    assert checkpoint["config"]["block_size"] == 32 and checkpoint["config"]["n_embd"] == 32
    start = GPT.from_pretrained(pretrained).state_dict()
    for name, weight in checkpoint["weights"].items():  # one step at lr 1e-9: still the pretrained weights
        torch.testing.assert_close(weight, start[name], atol=1e-6, rtol=0)
    code, out, _ = run_main(gpt2, capsys, "sample", "--out-dir", run, "--prompt", "Мой", "--max-new-tokens", "5",
                            "--device", "cpu")
    assert code == 0 and out.startswith("Мой")


# -----------------------------------------------------------------------------
# Bad folders: one line each


def edit_config(**changes):
    def spoil(folder):
        config = json.loads((folder / "config.json").read_text("utf-8"))
        (folder / "config.json").write_text(json.dumps({**config, **changes}), encoding="utf-8")
    return spoil


def remove(name):
    return lambda folder: (folder / name).unlink()


def write(name, data):
    return lambda folder: (folder / name).write_bytes(data)


def truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def drop_weight(folder):
    weights = load_file(folder / "model.safetensors")
    del weights["transformer.ln_f.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def mislabeled_dtype(folder):
    """float32 data under a header that says float64 (which loads, converted): its sizes do not add up."""
    data = bytearray((folder / "model.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'"F32"', b'"F64"')
    (folder / "model.safetensors").write_bytes(bytes(data[:8] + header + data[8 + n :]))


def other_tokenizer(folder):
    bpe.Tokenizer.train([RUSSIAN], 300).save_pretrained(folder)


def no_end_of_text(folder):
    vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
    vocab["<|pad|>"] = vocab.pop(bpe.EOT)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")


@pytest.mark.parametrize("spoil, key", [
    (remove("config.json"), "config.json"),
    (write("config.json", b"{not json"), "JSON"),
    (edit_config(model_type="llama", architectures=["LlamaForCausalLM"]), "gpt2"),
    (edit_config(activation_function="relu"), "activation_function"),
    (edit_config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (edit_config(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (edit_config(tie_word_embeddings=False), "tie_word_embeddings"),
    (edit_config(n_inner=100), "n_inner"),
    (edit_config(n_head=5), "n_head"),
    (edit_config(n_positions=64), "64"),
    (remove("model.safetensors"), "model.safetensors"),
    (write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!"), "corrupt"),
    (truncate_weights, "corrupt"),
    (write("model.safetensors", b""), "corrupt"),
    (mislabeled_dtype, "corrupt"),
    (drop_weight, "transformer.ln_f.weight"),
    (remove("vocab.json"), "vocab.json"),
    (other_tokenizer, "tokenizer"),
    (no_end_of_text, "beginning-of-text"),  # a blank prompt starts with nothing
])
def test_bad_folder_gives_one_line_and_exit_1(spoil, key, pretrained, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in pretrained.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    spoil(folder)
    code, _, err = run_main(gpt2, capsys, "sample", "--init-from", folder, "--device", "cpu", "--max-new-tokens", "1")
    assert one_line_error(code, err, key), err


def test_bad_pytorch_model_bin_gives_one_line(pretrained, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (folder / name).write_bytes((pretrained / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    code, _, err = run_main(gpt2, capsys, "eval", "--init-from", folder, "--text", folder / "vocab.json",
                            "--device", "cpu")
    assert one_line_error(code, err, "pytorch_model.bin"), err


def test_fine_tuning_into_a_run_with_another_tokenizer_is_refused(pretrained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    bpe.Tokenizer.train([RUSSIAN], 280).save(run / "tokenizer.json")
    code, _, err = run_main(gpt2, capsys, "train", "--init-from", pretrained, "--data", tmp_path, "--out-dir", run)
    assert one_line_error(code, err, "tokenizer"), err
