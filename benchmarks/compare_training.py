"""
Every model file trained the same way: the quality column of the README's comparison table, and its picture.

Each model trains with its own defaults on the same training novels and the same tokenizer.json
(trained once, copied into every run) for the same wall-clock budget: --max-time on one core
each (OMP_NUM_THREADS=1, pinned to its core), as many runs at a time as --parallel. Then `eval`
scores each run on the whole validation split, and plot_runs.py draws the curves.

    python benchmarks/compare_training.py --data DIR                # 10 minutes a run: ~85 minutes on 2 cores
    python benchmarks/compare_training.py --data DIR --quick        # tiny models, seconds a run: a smoke test

A run folder that already holds a ckpt.pt is not trained again, only scored.
"""

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bpe  # noqa: E402
from compare_models import MODELS  # noqa: E402
from plot_runs import main as plot_runs  # noqa: E402

SHARED = ["tokenizer.json", "tokenizer.source.json", "train.bin", "train.json", "val.bin", "val.json"]  # the same in every run
CURVE = ["--eval-interval", "50", "--eval-iters", "5"]  # twice the default's points for the picture, at its cost
QUICK = ["--block-size", "16", "--n-layer", "1", "--n-head", "4", "--n-embd", "32", "--batch-size", "4",
         "--eval-interval", "2", "--eval-iters", "2"]


def run_pinned(argv, core, log_path):
    """python ARGV on one thread pinned to `core` (where the OS allows), its output to log_path; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pin = (lambda: os.sched_setaffinity(0, {core})) if hasattr(os, "sched_setaffinity") else None
    result = subprocess.run([sys.executable, *map(str, argv)], env=env, preexec_fn=pin, cwd=ROOT,
                            capture_output=True, text=True, encoding="utf-8")
    log_path.write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: see {log_path}")
    return result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--data", default=bpe.default_data_dir(), help="the corpus (a folder of .txt novels)")
    parser.add_argument("--out-dir", default="runs/compare", help="a run folder per model goes here")
    parser.add_argument("--max-time", default="10m", help="each run's budget, as train's --max-time")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one core each")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="which files")
    parser.add_argument("--quick", action="store_true", help="tiny models and a 300-token vocabulary: a smoke test")
    args = parser.parse_args()
    out = Path(args.out_dir)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))

    # One tokenizer and one pair of token arrays, copied into every run: train finds them there and keeps them.
    bpe.prepare_corpus(args.data, out / "data", 300 if args.quick else 3000)
    for name in args.models:
        (out / name).mkdir(parents=True, exist_ok=True)
        for file in SHARED:
            shutil.copy(out / "data" / file, out / name / file)

    free_cores = queue.Queue()
    for core in cores[: args.parallel]:
        free_cores.put(core)

    def train_and_score(name):  # on a core no other run has meanwhile
        run, core = out / name, free_cores.get()
        try:
            if not (run / "ckpt.pt").exists():
                run_pinned([f"{name}.py", "train", "--data", args.data, "--out-dir", run, "--max-time", args.max_time,
                            "--device", "cpu", *(QUICK if args.quick else CURVE)], core, run / "train.out")
            scored = run_pinned([f"{name}.py", "eval", "--out-dir", run, "--device", "cpu"], core, run / "eval.out")
        finally:
            free_cores.put(core)
        return name, float(re.search(r"([\d.]+) bits per character", scored).group(1))

    with ThreadPoolExecutor(args.parallel) as pool:  # threads that wait on processes
        scores = dict(pool.map(train_and_score, args.models))
    table = ["| model | validation bits per character |", "|---|---|"]
    table += [f"| {name} | {bpc:.3f} |" for name, bpc in scores.items()]
    (out / "results.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    plot_runs([str(out / name) for name in args.models] + ["--out", str(out / "runs.png"),
              "--title", f"validation bits per character, {args.max_time} of one core each"])


if __name__ == "__main__":
    main()
