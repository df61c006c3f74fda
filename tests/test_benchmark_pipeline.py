"""benchmarks/pipeline.py runs (``--quick``: tiny, p = 2) and reports, for every schedule, the formula, the
logical-clock replay (equal to it) and the measured idle share per stage, and the activations held at each
stage's peak equal to the schedules' counts."""
import re

from test_benchmarks import run_bench


def test_pipeline_bench_reports_the_bubble_and_the_activations(tmp_path):
    report = run_bench("pipeline.py", tmp_path)
    bubble = re.findall(r"^\| 2 \| (\w+) \| (\d+) \| (\d) \| \S+ = ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", report, re.M)
    assert {row[0] for row in bubble} == {"afab", "1f1b", "interleaved"}, report
    assert all(formula == replay and 0 <= float(measured) < 1 for *_, formula, replay, measured in bubble), bubble
    held = re.findall(r"^\| 2 \| \w+ \| \d+ \| \d \| ([\d ]+) \| ([\d ]+) \|", report, re.M)
    assert len(held) == len(bubble) and all(measured == formula for measured, formula in held), held
    assert (tmp_path / "pipeline.png").exists()
