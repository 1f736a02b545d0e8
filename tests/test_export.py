"""`export` in every model file that has it: the run as a Hugging Face folder that
transformers loads as its family's class with our logits, whose tokenizer.json gives our
ids in AutoTokenizer, and that --init-from reads back as the same model: the same logits,
the same samples, and fine-tuning from it as from a released folder."""

import importlib

import pytest
import torch
from conftest import SENTENCES, one_line_error, run_main, train_args

import bpe

transformers = pytest.importorskip("transformers")

FAMILIES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "mixtral": "MixtralForCausalLM", "gemma": "GemmaForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "gemma3": "Gemma3ForCausalLM", "deepseek": "DeepseekV3ForCausalLM",
            "gpt_oss": "GptOssForCausalLM"}
PROMPT = "Мой дядя самых честных правил"


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, trained, tmp_path_factory):
    """(module, the run's folder, the exported folder)."""
    module = importlib.import_module(request.param)
    run = trained(request.param)
    folder = tmp_path_factory.mktemp(f"exported_{request.param}")
    assert module.main(["export", "--out-dir", str(run), "--to", str(folder)]) == 0
    return module, run, folder


def test_transformers_loads_the_family_with_our_logits(exported):
    module, run, folder = exported
    ours = module.load_trained(run, torch.device("cpu"))[0]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(theirs).__name__ == FAMILIES[module.__name__]
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)


def test_autotokenizer_gives_our_ids_and_text(exported):
    _, run, folder = exported
    tok = bpe.Tokenizer.load(run / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [PROMPT, *SENTENCES, " два  пробела\n\tи <|endoftext|> как текст 😀"]:
        assert hf(text).input_ids == tok.encode_prompt(text)  # <|endoftext|> first, as in training
        assert hf.decode(tok.encode(text)) == text


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_init_from_the_export_samples_as_the_run(exported, temperature, capsys):
    module, run, folder = exported
    args = ["--prompt", PROMPT, "--temperature", temperature, "--max-new-tokens", 12, "--device", "cpu"]
    code, from_run, _ = run_main(module, capsys, "sample", "--out-dir", run, *args)
    assert code == 0
    code, from_folder, _ = run_main(module, capsys, "sample", "--init-from", folder, *args)
    assert code == 0 and from_folder == from_run


def test_fine_tuning_from_the_export_starts_from_its_weights(exported, corpus, tmp_path, capsys):
    module, run, folder = exported
    out_dir = tmp_path / "tuned"
    code, _, err = run_main(module, capsys, *train_args(corpus, out_dir, "--init-from", folder,
                                                        "--max-iters", 1, "--lr", "1e-9"))
    assert code == 0, err
    tuned = module.load_trained(out_dir, torch.device("cpu"))[0]
    start = module.load_trained(run, torch.device("cpu"))[0].state_dict()
    # deepseek.py's routing biases move by bias_update_speed a step, whatever the learning rate.
    speed = getattr(tuned.config, "bias_update_speed", 0.0)
    for name, w in tuned.state_dict().items():
        atol = speed + 1e-6 if name.endswith("e_score_correction_bias") else 1e-6
        assert torch.allclose(w, start[name], atol=atol), name
    assert bpe.Tokenizer.load(out_dir / "tokenizer.json").fingerprint == \
        bpe.Tokenizer.load(run / "tokenizer.json").fingerprint


def test_export_into_a_run_is_refused(exported, tmp_path, capsys):
    """The run itself, or another, whose tokenizer.json its checkpoint needs."""
    module, run, _ = exported
    other = tmp_path / "other"
    other.mkdir()
    (other / "ckpt.pt").write_bytes(b"another run's checkpoint")
    for to in (run, other):
        code, _, err = run_main(module, capsys, "export", "--out-dir", run, "--to", to)
        assert one_line_error(code, err, "--to"), err
    assert not (other / "tokenizer.json").exists()


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_a_window_shorter_than_the_context_is_exported(name, tmp_path):
    module = importlib.import_module(name)
    tok = bpe.Tokenizer.train(SENTENCES, 300)
    config = getattr(module, f"{name.title()}Config")(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=4,
                                                      n_embd=32, n_kv_head=2, multiple_of=8, sliding_window=5)
    ours = getattr(module, name.title())(config).eval()
    module.export(ours, tok, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.sliding_window == 5
    idx = torch.randint(0, tok.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
