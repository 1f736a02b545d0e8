"""
Validation bits per character against wall-clock minutes, one curve per run, from each run's log.csv.

    python benchmarks/plot_runs.py checkpoints/gpt2 checkpoints/llama --out runs.png
    python benchmarks/plot_runs.py runs/lr-1e-3 runs/lr-3e-3 --title "two learning rates"

A curve is labelled by its run's folder name (by the path, where two folders share a name).
matplotlib is needed by this script alone (`pip install matplotlib`); the model files do not import it.
"""

import argparse
import csv
import sys
from pathlib import Path


def read_log(run_dir):
    """[(minutes, validation bits per character)] of a run, one point per evaluation."""
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.csv: it is not a run folder")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"elapsed_s", "val_bpc"} <= rows[0].keys():
        raise ValueError(f"{path} holds no evaluation yet, or is not a run's log")
    try:
        return [(float(row["elapsed_s"]) / 60, float(row["val_bpc"])) for row in rows]
    except (TypeError, ValueError) as e:  # a cut or edited line
        raise ValueError(f"{path}: {e}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, each with a log.csv")
    parser.add_argument("--out", default="runs.png", help="the PNG to write")
    parser.add_argument("--title", default="validation bits per character", help="the plot's title")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plot_runs.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # a file, no window
    import matplotlib.pyplot as plt

    names = [Path(run).name for run in args.runs]  # the folder names, or the paths where two share one
    labels = names if len(set(names)) == len(names) else args.runs
    try:
        curves = {label: read_log(run) for label, run in zip(labels, args.runs)}
    except (OSError, ValueError) as e:  # a missing, cut or foreign log.csv
        sys.exit(f"error: {e}")
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, points in curves.items():
        axes.plot(*zip(*points), marker=".", label=label)
    axes.set(xlabel="wall-clock minutes", ylabel="validation bits per character", title=args.title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(args.out)
    except OSError as e:
        sys.exit(f"error: cannot write {args.out}: {e.strerror}")
    print(f"wrote {args.out}: {len(curves)} runs")


if __name__ == "__main__":
    main()
