"""The attention and block-shapes benchmarks run (--quick), and the attention bytes equal their formulas."""
import re
import subprocess
import sys
from pathlib import Path

from minitp import launcher

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script, tmp_path, *args):
    environment = launcher.environment(dict(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return (tmp_path / script.replace(".py", ".md")).read_text()


def test_attention_bytes_are_the_formulas(tmp_path):
    report = run("attention.py", tmp_path)
    ratios = re.findall(r"^\| \d+ \| [\d,]+ \| ([\d.]+) \| [\d,]+ \| ([\d.]+) \|", report, flags=re.M)
    assert len(ratios) == 2 and all(value == "1.0000" for pair in ratios for value in pair), report
    assert "| dense |" in report


def test_block_shapes_bench_runs(tmp_path):
    report = run("speed_shapes.py", tmp_path)
    assert report.count("| s=") == 2, report
