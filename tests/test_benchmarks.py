"""The benchmarks run: each in its ``--quick`` mode (tiny sizes, 2 ranks), as a subprocess, writing its
markdown report into a temporary directory. The real runs are ``make bench``; here CI proves the scripts
and their MPI workers still work against the current API, and that the memory and communication
accounting still matches the papers' formulas (no unexplained byte).

Also: the PyTorch block the speed benchmark compares against computes what minitp's block computes
(skipped without PyTorch).
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from minitp import launcher

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def run_bench(script, tmp_path, *args):
    # the driver is a plain process outside any MPI job this test runs in; its workers use minitp.launcher too
    environment = launcher.environment(dict(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return (tmp_path / script.replace(".py", ".md")).read_text()


def unexplained(report):
    """The last column of every table row whose header ends in 'unexplained B'."""
    values = []
    for table in re.findall(r"^\|[^\n]*unexplained B \|\n(?:\|[^\n]*\n)+", report, flags=re.M):
        for row in table.strip().split("\n")[2:]:
            values.append(row.strip("| ").split(" | ")[-1])
    return values


def test_memory_bench_matches_the_formulas(tmp_path):
    report = run_bench("memory.py", tmp_path)
    values = unexplained(report)
    assert len(values) == 2 * 13  # 2 shapes x (none + 6 configs at t = 1, 2)
    assert set(values) == {"0"}, report
    assert (tmp_path / "memory.png").exists()


def test_comm_bench_matches_the_formulas(tmp_path):
    report = run_bench("comm.py", tmp_path)
    values = unexplained(report)
    assert len(values) == 2 * 5 * 2  # t = 1, 2 x 5 configs x forward, backward
    assert set(values) == {"0"}, report
    assert "vocab-parallel" in report and "gather logits" in report


def test_speed_bench_runs(tmp_path):
    report = run_bench("speed.py", tmp_path, "--no-torch")
    for section in ("One GPT block", "Strong scaling", "all-reduce bandwidth", "cProfile"):
        assert section in report
    assert (tmp_path / "speed.png").exists()


def test_the_pytorch_block_computes_minitps_block():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed
    finally:
        sys.path.remove(str(BENCHMARKS))
    from minitp import Tensor, no_grad
    from minitp.nn import TransformerBlock

    block = TransformerBlock(12, 3, dtype=numpy.float64, seed=2)
    for parameter in block.parameters():  # LayerNorm's ones and zeros would hide a swapped weight and bias
        parameter.data[...] = numpy.random.default_rng(parameter.size).standard_normal(parameter.shape)
    x = numpy.random.default_rng(0).standard_normal((5, 2, 12))
    with no_grad():
        expected = block(Tensor(x)).data
    leaves = speed.torch_leaves(torch, block)
    actual = speed.torch_block(torch, leaves, torch.tensor(x), heads=3, dropout=0.0).detach().numpy()
    assert numpy.abs(actual - expected).max() <= 1e-12
