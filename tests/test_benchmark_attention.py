"""The attention and block-shapes benchmarks run (--quick), and the attention bytes equal their formulas."""
import re

from test_benchmarks import run_bench as run  # the --quick driver in a subprocess, its report read back


def test_attention_bytes_are_the_formulas(tmp_path):
    report = run("attention.py", tmp_path)
    ratios = re.findall(r"^\| \d+ \| [\d,]+ \| ([\d.]+) \| [\d,]+ \| ([\d.]+) \|", report, flags=re.M)
    assert len(ratios) == 2 and all(value == "1.0000" for pair in ratios for value in pair), report
    assert "| dense |" in report


def test_block_shapes_bench_runs(tmp_path):
    report = run("speed_shapes.py", tmp_path)
    assert report.count("| s=") == 2, report
