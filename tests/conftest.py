"""Shared by every test file: one thread, the small Russian texts, tiny trained
runs, and helpers to run a model file in this process or from the shell.

Tiny models gain nothing from a second thread, and on a shared 2-core machine a
second thread makes them slower and their timing erratic. Nothing needs the real
corpus: the tests write their own small novels."""

import importlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model, std=0.3, seed=0):
    """Weights far from the gentle init, norm gains around 1: sharp attention and
    confident logits, so that a wrong mask, rotation or stale cache shows clearly."""
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
    "Старик снял шапку, перекрестился и медленно пошёл к реке.",
    "— Ну, полно, полно, — сказала бабушка. — Ешь, пока горячее.",
    "Вечером все собрались в гостиной, и разговор зашёл о литературе.",
    "Письмо пришло только через неделю, когда уже было поздно.",
]


def write_novels(folder, n_novels=3, sentences_per_novel=60):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n_novels):
        text = "\n".join(" ".join(rng.sample(SENTENCES, 4)) for _ in range(sentences_per_novel // 4))
        (folder / f"Author{i}_Novel{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_novels(tmp_path_factory.mktemp("corpus"))


# -----------------------------------------------------------------------------
# Running a model file

TINY = ["--vocab-size", "300", "--block-size", "16", "--n-layer", "2", "--n-head", "4", "--n-embd", "32",
        "--batch-size", "4", "--warmup-iters", "2", "--eval-iters", "2", "--device", "cpu"]


def train_args(corpus, out_dir, *more):
    return ["train", "--data", str(corpus), "--out-dir", str(out_dir), *TINY, *map(str, more)]


def run_main(module, capsys, *argv):
    """module.main in this process: (exit code, stdout, stderr); argparse's own
    errors exit through SystemExit."""
    capsys.readouterr()  # what came before, such as a fixture's training run
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(name, *argv, timeout=120, **env):
    """python NAME.py ARGV from the shell, with env added to the environment; output read as UTF-8."""
    return subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *map(str, argv)], capture_output=True,
                          encoding="utf-8", env={**SUBPROCESS_ENV, **env}, timeout=timeout, cwd=ROOT)


def one_line_error(code, err, key):
    """A user's mistake: exit code 1 and one line on stderr that names the key fact."""
    return code == 1 and err.startswith("error: ") and err.count("\n") == 1 and key in err \
        and "Traceback" not in err


def checkpoint(out_dir):
    """A run's ckpt.pt as saved: model, config, step, weights, optimizer, ..."""
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)


def weights(module, out_dir):
    """The weights of the run in out_dir, as module.load_trained reads them."""
    return module.load_trained(out_dir, torch.device("cpu"))[0].state_dict()


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
    """trained(name): a tiny run of NAME.py, trained for a few steps on the corpus
    once per session: its out_dir, with ckpt.pt and tokenizer.json."""
    runs = {}

    def run(name):
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(f"trained_{name}")
            module = importlib.import_module(name)
            assert module.main(train_args(corpus, runs[name], "--max-iters", 4, "--eval-interval", 2)) == 0
        return runs[name]

    return run
