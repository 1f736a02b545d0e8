"""Tests for gpt1.py: the Post-LN model against a hand-written reference, its
ReLU and initialisation, generation without a cache, training and resume, the
command line end to end, and that outside the model gpt1.py is gpt2.py's code.

Everything runs on tiny models and on a few small Russian texts written here;
nothing needs the real corpus. One thread, as in test_gpt2.py.
"""

import ast
import difflib
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bpe  # noqa: E402
import gpt1  # noqa: E402
import gpt2  # noqa: E402
from gpt1 import GPT, GPTConfig  # noqa: E402

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def randomize(model, std=0.3, seed=0):
    """Weights far from the gentle init, LayerNorm gains and biases included:
    sharp attention and confident logits, so that a wrong mask or a missing
    normalisation changes the output clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


# -----------------------------------------------------------------------------
# A small corpus, written here: three "novels" made of Russian sentences.

SENTENCES = [
    "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему.",
    "— Что же вы молчите? — спросила она, не поднимая глаз.",
    "Он долго ходил по комнате, потом сел к окну и стал смотреть на улицу.",
    "Весна в том году была ранняя, и уже в марте в саду зацвели яблони.",
    "— Я не знаю, — ответил он тихо, — право, не знаю.",
    "Мой дядя самых честных правил, когда не в шутку занемог.",
    "За окном шёл снег, и в печке потрескивали сухие берёзовые дрова.",
    "Никто не знал, откуда он приехал и зачем остановился в нашем городе.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(3):
        text = "\n".join(" ".join(rng.sample(SENTENCES, 4)) for _ in range(15))
        (folder / f"Author{i}_Novel{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


TINY = ["--vocab-size", "300", "--block-size", "16", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--batch-size", "4", "--warmup-iters", "2", "--eval-iters", "2", "--device", "cpu"]


def train_args(corpus, out_dir, *more):
    return ["train", "--data", str(corpus), "--out-dir", str(out_dir), *TINY, *more]


def run_main(capsys, *argv, module=gpt1):
    """module.main in this process: (exit code, stdout, stderr); argparse's own
    errors exit through SystemExit."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "gpt1.py"), *map(str, argv)], capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny gpt1 model trained for a few steps: out_dir with ckpt.pt and tokenizer.json."""
    out_dir = tmp_path_factory.mktemp("trained")
    assert gpt1.main(train_args(corpus, out_dir, "--max-iters", "4", "--eval-interval", "2")) == 0
    return out_dir


# -----------------------------------------------------------------------------
# Model: the parts


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(8\)"):
        GPTConfig(n_embd=30, n_head=8)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        GPTConfig(dropout=1.0)


@pytest.mark.parametrize("T", [1, 2, 7])
def test_fused_attention_equals_written_out(T):
    generator = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    expected = gpt1.attention(q, k, v)
    assert torch.allclose(gpt1.fused_attention(q, k, v), expected, atol=1e-12)
    # The mask matters: the last query sees everything, the first (if T > 1) only itself.
    unmasked = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    assert torch.allclose(expected[..., -1, :], unmasked[..., -1, :], atol=1e-12)
    assert torch.allclose(expected[..., 0, :], v[..., 0, :], atol=1e-12)


def test_model_with_fused_attention_equals_written_out(monkeypatch):
    """Logits and gradients."""
    model = randomize(GPT(GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16)).double())
    idx = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    fused = run()
    monkeypatch.setattr(gpt1, "FUSED", False)
    written_out = run()
    assert torch.allclose(fused[0], written_out[0], atol=1e-10)
    for g_fused, g_written in zip(fused[1], written_out[1], strict=True):
        assert torch.allclose(g_fused, g_written, atol=1e-10)


def test_mlp_is_linear_relu_linear():
    torch.manual_seed(0)
    mlp = gpt1.MLP(GPTConfig(n_embd=8)).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    hidden = mlp.c_fc(x)
    assert (hidden < 0).any()  # the ReLU has something to cut
    assert torch.allclose(mlp(x), mlp.c_proj(hidden.clamp(min=0)), atol=1e-12)
    assert not torch.allclose(mlp(x), mlp.c_proj(F.gelu(hidden)), atol=1e-6)


def test_weight_names_are_gpt2s_without_the_final_layernorm():
    config = dict(vocab_size=10, block_size=4, n_layer=2, n_head=1, n_embd=4)
    ours = set(GPT(GPTConfig(**config)).state_dict())
    theirs = set(gpt2.GPT(gpt2.GPTConfig(**config)).state_dict())
    assert ours == theirs - {"transformer.ln_f.weight", "transformer.ln_f.bias"}


# -----------------------------------------------------------------------------
# Model: the whole


def reference_forward(model, idx):
    """GPT-1's forward written from its weights alone, in plain tensor algebra:
    Post-LN blocks x = LN(x + Attn(x)), x = LN(x + ReLU-MLP(x)), no final LayerNorm,
    the head tied to the token embedding."""
    w = model.state_dict()
    config = model.config
    B, T = idx.shape
    n_head, head_size = config.n_head, config.n_embd // config.n_head

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def layer_norm(x, name):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][:T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for layer in range(config.n_layer):
        h = f"transformer.h.{layer}."
        q, k, v = linear(x, h + "attn.c_attn").split(config.n_embd, dim=-1)
        q, k, v = (t.reshape(B, T, n_head, head_size).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(head_size)).masked_fill(future, float("-inf"))
        heads = scores.softmax(-1) @ v  # (B, n_head, T, head_size)
        x = layer_norm(x + linear(heads.transpose(1, 2).reshape(B, T, -1), h + "attn.c_proj"), h + "ln_1")
        x = layer_norm(x + linear(linear(x, h + "mlp.c_fc").relu(), h + "mlp.c_proj"), h + "ln_2")
    return x @ w["transformer.wte.weight"].T


@pytest.mark.parametrize("fused", [True, False])
def test_forward_equals_a_hand_written_post_ln_gpt(fused, monkeypatch):
    monkeypatch.setattr(gpt1, "FUSED", fused)
    model = randomize(GPT(GPTConfig(vocab_size=30, block_size=10, n_layer=3, n_head=2, n_embd=16)).double())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(idx)[0], reference_forward(model, idx), atol=1e-10)
    assert torch.allclose(model(idx[:, :4])[0], reference_forward(model, idx[:, :4]), atol=1e-10)


def test_every_block_output_is_layer_normalised():
    """At init (LayerNorm gain 1, bias 0) every position of every block's output,
    the residual stream itself, has mean 0 and standard deviation 1. In Pre-LN
    (gpt2.py) the stream is never normalised: the same check fails there."""

    def block_outputs(model, idx):
        outputs = []
        hooks = [block.register_forward_hook(lambda m, i, out: outputs.append(out)) for block in model.transformer.h]
        model(idx)
        for hook in hooks:
            hook.remove()
        return outputs

    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=32)
    idx = torch.randint(0, 50, (2, 8))
    for out in block_outputs(GPT(GPTConfig(**config)), idx):
        assert torch.allclose(out.mean(-1), torch.zeros(2, 8), atol=1e-5)
        assert torch.allclose(out.std(-1, unbiased=False), torch.ones(2, 8), atol=1e-3)
    pre_ln = block_outputs(gpt2.GPT(gpt2.GPTConfig(**config)), idx)
    assert not torch.allclose(pre_ln[-1].std(-1, unbiased=False), torch.ones(2, 8), atol=0.1)


def test_initialisation_is_n_0_002_everywhere():
    """No 1/sqrt(2 * n_layer) scaling of the residual projections: that is GPT-2's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2000, block_size=256, n_layer=8, n_head=4, n_embd=256))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
            assert abs(p.mean().item()) < 0.002, name
        elif name.endswith(("ln_1.weight", "ln_2.weight")):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 100, (3, 8))
    logits, loss = model(idx)
    assert logits.shape == (3, 8, 100) and loss is None
    _, loss = model(idx, targets=torch.randint(0, 100, (3, 8)))
    assert abs(loss.item() - math.log(100)) < 0.1  # at init, close to uniform over the vocabulary
    with pytest.raises(ValueError, match="9 tokens do not fit the context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("fused", [True, False])
def test_changing_a_future_token_never_changes_earlier_logits(fused, monkeypatch):
    monkeypatch.setattr(gpt1, "FUSED", fused)
    model = randomize(GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=4, n_embd=32)))
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (2, 16), generator=generator)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 38, (2,), generator=generator)) % 40
        before, after = model(idx)[0], model(changed)[0]
        assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)
        assert not torch.allclose(before[:, t], after[:, t], atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(n_layer=st.integers(1, 2), block_size=st.integers(1, 8), prompt_length=st.integers(1, 12),
       new_tokens=st.integers(0, 12), seed=st.integers(0, 1000))
def test_greedy_generation_is_deterministic_and_follows_the_cropped_window(n_layer, block_size, prompt_length,
                                                                            new_tokens, seed):
    """In float64, so that no near-tie flips a token. Each new token is the argmax
    of a forward over the last block_size tokens, also past the context."""
    config = GPTConfig(vocab_size=20, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=8)
    model = randomize(GPT(config).double(), std=0.5, seed=seed)
    prompt = torch.randint(0, 20, (2, prompt_length), generator=torch.Generator().manual_seed(seed))
    out = model.generate(prompt, new_tokens, temperature=0)
    assert out.shape == (2, prompt_length + new_tokens) and torch.equal(out[:, :prompt_length], prompt)
    assert torch.equal(model.generate(prompt, new_tokens, temperature=0), out)
    for t in range(prompt_length, prompt_length + new_tokens):
        assert torch.equal(out[:, t], model(out[:, max(0, t - block_size) : t])[0][:, -1].argmax(-1))


def test_sampling_options():
    torch.manual_seed(0)
    model = randomize(GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8)), std=0.5)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(model.generate(prompt, 10, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 10, top_p=1e-9), greedy)
    assert model.generate(prompt, 10, top_k=10**6).shape == (2, 13)  # top_k is clamped to the vocabulary
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(prompt, 1, **bad)
    with pytest.raises(TypeError):
        model.generate(prompt, 1, use_cache=True)  # there is no cache in GPT-1


# -----------------------------------------------------------------------------
# Training


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64))
    optimizer = gpt1.configure_optimizer(model, gpt1.TrainConfig(lr=3e-3, weight_decay=0.0), torch.device("cpu"))
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05  # from ln(64) = 4.16: random targets, learned by heart


def test_resume_continues_exactly(corpus, tmp_path, capsys):
    """8 steps straight == 4 steps, then --resume for 4 more: the same weights and
    optimizer state, bit for bit (with dropout and gradient accumulation on)."""
    common = ["--lr-decay-iters", "8", "--eval-interval", "3", "--dropout", "0.1", "--grad-accum", "2"]
    assert run_main(capsys, *train_args(corpus, tmp_path / "straight", *common, "--max-iters", "8"))[0] == 0
    assert run_main(capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", "4"))[0] == 0
    code, out, _ = run_main(capsys, *train_args(corpus, tmp_path / "split", *common, "--max-iters", "8", "--resume"))
    assert code == 0 and "resuming" in out and "at step 4" in out
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert straight["model"] == split["model"] == "gpt1"
    assert straight["step"] == split["step"] == 8
    for name, w in straight["weights"].items():
        assert torch.equal(w, split["weights"][name]), name
    for a, b in zip(straight["optimizer"]["state"].values(), split["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


# -----------------------------------------------------------------------------
# Command line


def test_defaults():
    assert gpt1.TrainConfig().out_dir == "checkpoints/gpt1"
    config = GPTConfig()
    assert (config.vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd) == (
        3000, 256, 6, 8, 256)


def test_cli_train_sample_eval(corpus, tmp_path):
    out_dir = tmp_path / "run"
    result = run_cli(*train_args(corpus, out_dir, "--max-iters", "4", "--eval-interval", "2"))
    assert result.returncode == 0, result.stderr
    assert "gpt1:" in result.stdout and "eval step 4" in result.stdout and "bpc" in result.stdout
    assert {"tokenizer.json", "train.bin", "val.bin", "ckpt.pt", "log.csv"} <= {p.name for p in out_dir.iterdir()}

    result = run_cli("sample", "--out-dir", out_dir, "--prompt", "Мой дядя", "--max-new-tokens", "20",
                     "--num-samples", "2", "--top-k", "100000", "--top-p", "0.9", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Мой дядя") and result.stdout.count("Мой дядя") == 2
    assert "tokens/s" in result.stderr

    result = run_cli("eval", "--out-dir", out_dir, "--data", corpus, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "validation split" in result.stdout and "bits per character" in result.stdout


def test_greedy_sample_from_the_command_line_is_deterministic(trained, capsys):
    argv = ["sample", "--out-dir", trained, "--max-new-tokens", "30", "--temperature", "0", "--ignore-eot",
            "--device", "cpu"]
    code, out, err = run_main(capsys, *argv)
    assert code == 0 and out.strip() and "30 tokens in" in err
    assert run_main(capsys, *argv, "--seed", "7")[:2] == (0, out)


def test_help_lists_every_flag_with_its_default(capsys):
    commands = gpt1.build_parser()._subparsers._group_actions[0].choices
    for command, parser in commands.items():
        assert run_main(capsys, command, "--help")[0] == 0
        for action in parser._actions:
            if action.dest != "help":
                assert "default: " in parser._get_formatter()._get_help_string(action), action.dest


@pytest.fixture(scope="module")
def gpt2_run(corpus, tmp_path_factory):
    """A gpt2.py checkpoint, which gpt1.py must refuse."""
    out_dir = tmp_path_factory.mktemp("gpt2_run")
    assert gpt2.main(train_args(corpus, out_dir, "--max-iters", "1")) == 0
    return out_dir


def other_tokenizer(out_dir):
    bpe.Tokenizer.train([" ".join(SENTENCES[:3])], 280).save(out_dir / "tokenizer.json")


def garbage_checkpoint(out_dir):
    (out_dir / "ckpt.pt").write_bytes(b"not a checkpoint at all")


def shape_mismatch_checkpoint(out_dir):
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "n_embd": 64}}, out_dir / "ckpt.pt")


@pytest.mark.parametrize("module, spoil, argv, message", [
    (gpt1, None, ["sample", "--out-dir", "{gpt2_run}"], "checkpoint of 'gpt2', not of 'gpt1'"),
    (gpt1, None, ["eval", "--out-dir", "{gpt2_run}"], "checkpoint of 'gpt2', not of 'gpt1'"),
    (gpt1, None, ["train", "--data", "{corpus}", "--out-dir", "{gpt2_run}", *TINY, "--resume"],
     "checkpoint of 'gpt2', not of 'gpt1'"),
    (gpt2, None, ["sample", "--out-dir", "{run}"], "checkpoint of 'gpt1', not of 'gpt2'"),
    (gpt1, None, ["train", "--data", "{tmp}/nowhere", "--out-dir", "{run}"], "no corpus at"),
    (gpt1, None, ["sample", "--out-dir", "{tmp}/empty"], "no checkpoint at"),
    (gpt1, other_tokenizer, ["sample", "--out-dir", "{run}"], "another tokenizer"),
    (gpt1, garbage_checkpoint, ["eval", "--out-dir", "{run}"], "corrupt or not a checkpoint"),
    (gpt1, shape_mismatch_checkpoint, ["sample", "--out-dir", "{run}"], "weights do not fit its config"),
    (gpt1, None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--n-embd", "30"], "must be divisible"),
    (gpt1, None, ["train", "--data", "{corpus}", "--out-dir", "{tmp}/new", "--device", "tpu"], "unknown device"),
    (gpt1, None, ["train", "--data", "{corpus}", "--out-dir", "{run}", *TINY, "--n-layer", "3", "--resume"],
     "another model shape: n_layer=2 (asked: 3)"),
    (gpt1, None, ["sample", "--out-dir", "{run}", "--temperature", "-1"], "temperature must be"),
    (gpt1, None, ["sample", "--out-dir", "{run}", "--no-cache"], "unrecognized arguments: --no-cache"),
    (gpt1, None, ["sample", "--out-dir", "{run}", "--prompt-file", "{tmp}/none.txt"], "no such file"),
])
def test_bad_input_gives_one_line_and_exit_1(module, spoil, argv, message, trained, gpt2_run, corpus, tmp_path,
                                             capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    if spoil:
        spoil(run)
    argv = [a.format(tmp=tmp_path, run=run, corpus=corpus, gpt2_run=gpt2_run) for a in argv]
    code, _, err = run_main(capsys, *argv, module=module)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)  # corrupt
    result = run_cli("eval", "--out-dir", tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


# -----------------------------------------------------------------------------
# gpt1.py and gpt2.py: outside the model, one and the same code
#
# Both files have the same sections. The model differs by design; the rest
# (TrainConfig, data, training, sampling, command line) must be the same code
# after renaming gpt2 -> gpt1 (TrainConfig: its fields, not their defaults),
# except for the by-design differences below, so
# that `diff gpt1.py gpt2.py` shows a reader only what GPT-2 changed. gpt2.py
# may have more than gpt1.py: definitions of its own (loading OpenAI's GPT-2
# weights, exporting: issue 5) and lines about them in shared code, recognised
# by the names in GPT2_ONLY.

SECTIONS = ["Config", "Model", "Data", "Training", "Sampling", "Command line"]
SHARED_SECTIONS = ["Data", "Training", "Sampling", "Command line"]
GPT2_ONLY = re.compile(r"init.from|pretrained|export|norm_eps")  # features gpt1.py does not get


def normalise_gpt2(source):
    """gpt2.py's text with gpt1.py's names, and without its KV-cache option in the
    sample command: the by-design differences outside the model."""
    source = source.replace("gpt2", "gpt1").replace("GPT-2", "GPT-1")
    source = re.sub(r",\s*use_cache=not args\.no_cache\)", ")", source)
    return re.sub(r'^.*"--no-cache".*\n', "", source, flags=re.MULTILINE)


def top_level_units(source):
    """{name: (section, source text)} of a file's top-level statements: functions
    and classes (with their decorators) by name, others by their first line."""
    lines = source.splitlines(keepends=True)
    headers = [(i + 1, lines[i + 1].strip("# \n")) for i, line in enumerate(lines[:-1])
               if re.fullmatch(r"# -{20,}\n", line)]
    units = {}
    for node in ast.parse(source).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        name = getattr(node, "name", None) or lines[node.lineno - 1].strip()
        section = max((h for h in headers if h[0] < first), default=(0, "preamble"))[1]
        units[name] = (section, "".join(lines[first - 1 : node.end_lineno]))
    return units, [name for _, name in headers]


def unmirrored_changes(gpt1_source, gpt2_source):
    """What differs between the two files outside the model and is not by design:
    a list of readable hunks, empty when the files are in step."""
    ours, our_sections = top_level_units(gpt1_source)
    theirs, their_sections = top_level_units(normalise_gpt2(gpt2_source))
    problems = []
    if our_sections != SECTIONS or [s for s in their_sections if s in SECTIONS] != SECTIONS:
        problems.append(f"sections: gpt1.py {our_sections}, gpt2.py {their_sections}")
    for name, (section, text) in ours.items():
        if name not in theirs:
            problems.append(f"{name} ({section}) is in gpt1.py only")
            continue
        if theirs[name][0] != section:
            problems.append(f"{name} is under {section} in gpt1.py, under {theirs[name][0]} in gpt2.py")
        if section not in SHARED_SECTIONS and name != "TrainConfig":
            continue
        a, b = text.splitlines(), theirs[name][1].splitlines()
        if name == "TrainConfig":  # the defaults differ by design (tuned per model): compare the fields
            a, b = ([re.sub(r"^(    \w+: [^=]+)=.*", r"\1", line) for line in lines] for lines in (a, b))
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if tag != "equal" and not GPT2_ONLY.search("\n".join(b[j1:j2])):
                problems.append("\n".join([f"{name}:", *("- " + s for s in a[i1:i2]), *("+ " + s for s in b[j1:j2])]))
    return problems


def test_outside_the_model_gpt1_is_gpt2s_code():
    gpt1_source = (ROOT / "gpt1.py").read_text(encoding="utf-8")
    gpt2_source = (ROOT / "gpt2.py").read_text(encoding="utf-8")
    problems = unmirrored_changes(gpt1_source, gpt2_source)
    assert not problems, "gpt1.py and gpt2.py are out of step:\n\n" + "\n\n".join(problems)


def test_the_check_catches_an_unmirrored_change():
    """Edits to the two files as they are now: each must add to the problems found
    (or not, for a GPT-2-only feature)."""
    gpt1_source = (ROOT / "gpt1.py").read_text(encoding="utf-8")
    gpt2_source = (ROOT / "gpt2.py").read_text(encoding="utf-8")
    found = unmirrored_changes(gpt1_source, gpt2_source)
    step = "    optimizer.zero_grad(set_to_none=True)\n"
    assert gpt2_source.count(step) == 1
    changed = gpt2_source.replace(step, "    optimizer.zero_grad()\n")
    added = gpt2_source.replace(step, step + "    model.zero_grad()\n")
    for edited in (changed, added):
        assert [p for p in unmirrored_changes(gpt1_source, edited) if p not in found][0].startswith("train_step:")
    extra = gpt1_source + "\n\ndef extra():\n    pass\n"
    assert unmirrored_changes(extra, gpt2_source) == [*found, "extra (Command line) is in gpt1.py only"]
    # ... while GPT-2-only features pass: a definition of their own, a line about them.
    extended = gpt2_source.replace(step, step + "    load_pretrained(model, cfg.init_from)\n")
    extended += "\n\ndef cmd_export(args):\n    pass\n"
    assert unmirrored_changes(gpt1_source, extended) == found
