"""Released checkpoints from text, in every model file: a random small Hugging Face model
of the family, saved with a tokenizer.json of the family's kind (tests/families.py).
`sample --init-from DIR --prompt TEXT --temperature 0` prints what transformers' greedy
generate and decode print; `eval --init-from DIR --text FILE` scores with its tokenizer."""

import importlib
import shutil

import families
import pytest
import torch
from conftest import one_line_error, run_main
from test_deepseek import hf_deepseek
from test_gemma import hf_gemma
from test_gemma3 import hf_gemma3
from test_gpt_oss import hf_gpt_oss
from test_llama import LLAMA3_ROPE, hf_llama
from test_mixtral import hf_mixtral
from test_qwen3 import hf_qwen3

import bpe

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")


def hf_gpt2(folder, **kwargs):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **kwargs)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    model.save_pretrained(folder)
    return model


# model file, tokenizer form, the model's builder and settings
RELEASED = {
    "gpt2": ("gpt2", "gpt2", hf_gpt2, {}),
    "tinyllama": ("llama", "llama2", hf_llama, {}),
    "llama3": ("llama", "llama3", hf_llama, dict(rope_parameters=LLAMA3_ROPE)),
    "smollm": ("llama", "smollm", hf_llama, dict(tie_word_embeddings=True)),
    "mistral": ("mistral", "metaspace", hf_llama, dict(family="Mistral", sliding_window=None)),
    "mixtral": ("mixtral", "llama2", hf_mixtral, dict(sliding_window=None)),
    "gemma": ("gemma", "gemma", hf_gemma, {}),
    "qwen3": ("qwen3", "qwen", hf_qwen3, dict(tie_word_embeddings=True)),
    "gemma3": ("gemma3", "gemma", hf_gemma3, {}),
    "gemma2": ("gemma3", "gemma", hf_gemma3, dict(family="Gemma2")),
    "deepseek": ("deepseek", "deepseek", hf_deepseek, {}),
    "gpt_oss": ("gpt_oss", "o200k", hf_gpt_oss, {}),
}
PROMPT = "Мой дядя самых честных правил, hello 2024"


@pytest.fixture(scope="module", params=list(RELEASED))
def released(request, tmp_path_factory):
    """(model file's module, folder, transformers model, AutoTokenizer)."""
    name, form, build, settings = RELEASED[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    families.save_folder(form, folder)
    tok = bpe.Tokenizer.from_pretrained(folder)
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if name != "gpt2":
        ids["max_position_embeddings"] = 64
    model = build(folder, **ids, **settings)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    return importlib.import_module(name), folder, model, hf_tok


def test_greedy_text_equals_transformers(released, capsys):
    module, folder, model, hf_tok = released
    prompt = hf_tok(PROMPT, return_tensors="pt").input_ids
    new = model.generate(prompt, max_new_tokens=20, do_sample=False,
                         attention_mask=torch.ones_like(prompt))[0, prompt.size(1):].tolist()
    if hf_tok.eos_token_id in new:  # generate stops after it, sample before
        new = new[: new.index(hf_tok.eos_token_id)]
    code, out, err = run_main(module, capsys, "sample", "--init-from", folder, "--prompt", PROMPT,
                              "--temperature", 0, "--max-new-tokens", 20, "--device", "cpu")
    text = hf_tok.decode(prompt[0].tolist() + new, skip_special_tokens=False)
    if hf_tok.bos_token_id == prompt[0, 0]:  # the beginning-of-text token is not printed
        text = hf_tok.decode(prompt[0, 1:].tolist() + new, skip_special_tokens=False)
    assert code == 0, err
    assert out == text + "\n" and len(new) >= 5  # long enough to tell



def test_a_blank_page_prints_what_transformers_decodes(released, capsys, monkeypatch):
    """No prompt: the text starts at the beginning-of-text token, and a first word with a space
    before it is printed as transformers decodes it (SentencePiece's drops that space)."""
    module, folder, _, hf_tok = released
    if hf_tok.bos_token_id is None:
        pytest.skip("no beginning-of-text token: a blank page has nothing to start from")
    vocab = sorted(hf_tok.get_vocab().items())
    word = next(id for token, id in vocab if token[:1] in ("\u2581", "\u0120") and len(token) > 2)
    monkeypatch.setattr(module, "sample_next", lambda logits, *options: torch.tensor([[word]]))
    code, out, err = run_main(module, capsys, "sample", "--init-from", folder, "--max-new-tokens", 1,
                              "--device", "cpu")
    assert code == 0 and out == hf_tok.decode([word]) + "\n", err

def test_eval_scores_a_text_with_the_folders_tokenizer(released, tmp_path, capsys):
    module, folder, model, hf_tok = released
    (tmp_path / "text.txt").write_text(PROMPT * 3, encoding="utf-8")
    code, out, err = run_main(module, capsys, "eval", "--init-from", folder, "--text", tmp_path / "text.txt",
                              "--device", "cpu")
    n_tokens = len(hf_tok(PROMPT * 3).input_ids) - 1
    assert code == 0 and "bits per character" in out and f"({n_tokens:,} tokens)" in out, err


def test_fine_tuning_needs_a_tokenizer_that_bpe_py_can_train_with(released, tmp_path, capsys):
    module, folder, _, _ = released
    tok = bpe.Tokenizer.from_pretrained(folder)
    if type(tok) is bpe.Tokenizer and bpe.EOT in tok.special_tokens:
        pytest.skip("a byte-level BPE with <|endoftext|>: fine-tuning takes it")
    code, _, err = run_main(module, capsys, "train", "--init-from", folder, "--out-dir", tmp_path / "run",
                            "--data", tmp_path, "--device", "cpu")
    assert one_line_error(code, err, "byte-level BPE"), err


def test_a_large_models_shards_load_as_one_file(released, tmp_path, capsys):
    """A large model's folder holds its weights in shards, model-00001-of-0000N.safetensors, ...,
    which model.safetensors.index.json names: they give the text that one file gives, and a
    missing shard is named in one line."""
    module, folder, model, _ = released
    sharded = shutil.copytree(folder, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    argv = ["--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 8, "--device", "cpu"]
    outputs = [run_main(module, capsys, "sample", "--init-from", f, *argv)[:2] for f in (folder, sharded)]
    assert outputs[0][0] == 0 and outputs[1] == outputs[0]  # the same text (stderr: the speed)
    shards[-1].unlink()
    code, _, err = run_main(module, capsys, "sample", "--init-from", sharded, *argv)
    assert one_line_error(code, err, shards[-1].name), err
