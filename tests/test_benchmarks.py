"""The scripts behind the README's comparison table and picture run, on tiny inputs; what they
measure is asserted only where a broken script would get it wrong, never a speed (speed is a
benchmark's business, not a test's)."""

import importlib.util
import math
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SUBPROCESS_ENV
from test_models import MODELS

LOG = "step,lr,train_loss,train_bpc,val_loss,val_bpc,tokens_per_s,elapsed_s\n"


def run_script(name, *argv):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, argv)], capture_output=True,
                          encoding="utf-8", env=SUBPROCESS_ENV, cwd=ROOT, timeout=300)


def test_plot_runs_draws_a_curve_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    for name, bpc in (("lr-1e-3", [4.1, 3.2, 2.9]), ("lr-3e-3", [4.0, 3.0, 2.6])):
        (tmp_path / name).mkdir()
        rows = [f"{100 * i},0.001,2,{b},2,{b},5000,{60.0 * i}\n" for i, b in enumerate(bpc, 1)]
        (tmp_path / name / "log.csv").write_text(LOG + "".join(rows))
    result = run_script("plot_runs.py", tmp_path / "lr-1e-3", tmp_path / "lr-3e-3", "--out", tmp_path / "runs.png")
    assert result.returncode == 0 and "2 runs" in result.stdout, result.stderr
    assert (tmp_path / "runs.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "b" / "lr-1e-3").mkdir(parents=True)  # two runs of one name: labelled by their paths
    (tmp_path / "b" / "lr-1e-3" / "log.csv").write_text((tmp_path / "lr-1e-3" / "log.csv").read_text())
    result = run_script("plot_runs.py", tmp_path / "lr-1e-3", tmp_path / "b" / "lr-1e-3", "--out", tmp_path / "2.png")
    assert result.returncode == 0 and "2 runs" in result.stdout, result.stderr
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "log.csv").write_text(LOG)  # a run not evaluated yet
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "log.csv").write_text(LOG + "100,0.001,2,2.5,2,abc,5000,60\n")
    for bad in (tmp_path / "nowhere", tmp_path / "fresh", tmp_path / "cut"):
        result = run_script("plot_runs.py", bad, "--out", tmp_path / "bad.png")
        assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    result = run_script("plot_runs.py", tmp_path / "lr-1e-3", "--out", tmp_path / "no" / "such" / "folder.png")
    assert result.returncode == 1 and result.stderr.startswith("error: cannot write") and result.stderr.count("\n") == 1


def test_compare_models_prints_a_row_per_model():
    result = run_script("compare_models.py", "--quick", "--models", *MODELS)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\| (\w+) \| [\d.]+M \| [\d.]+M \| [\d,]+ \| .* \|$", result.stdout, re.MULTILINE)
    assert rows == MODELS, result.stdout


def test_compressors_print_a_finite_rate_per_compressor(tmp_path):
    lines = [f"Строка {i % 7}: мама мыла раму, а папа читал газету.\n" for i in range(400)]
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(name + "".join(lines), encoding="utf-8")
    result = run_script("compressors.py", "--data", tmp_path, "--quick")
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+) \| [\d.]+ \|$", result.stdout, re.MULTILINE))
    expected = ["xz -9e (lzma)", "bzip2 -9"]
    if importlib.util.find_spec("pyppmd"):
        expected += ["PPMd order 10", "PPMd order 12, primed on train"]
    else:
        assert "pip install pyppmd" in result.stdout
    assert list(rows) == expected, result.stdout
    assert all(0 < float(bpc) < math.inf for bpc in rows.values()), result.stdout
    assert float(rows["bzip2 -9"]) < 1, result.stdout  # a repeated text: far below 8 bits
