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

try:
    import matplotlib  # noqa: F401 -- the [bench] extra: without it the benches skip their plots, saying so
    PLOTS = True
except ImportError:
    PLOTS = False
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
    assert (tmp_path / "memory.png").exists() or not PLOTS


def test_comm_bench_matches_the_formulas(tmp_path):
    report = run_bench("comm.py", tmp_path)
    values = unexplained(report)
    assert len(values) == 2 * 5 * 2  # t = 1, 2 x 5 configs x forward, backward
    assert set(values) == {"0"}, report
    assert "vocab-parallel" in report and "gather logits" in report


def test_context_bench_matches_the_formulas(tmp_path):
    report = run_bench("context.py", tmp_path)
    values = unexplained(report)
    assert len(values) == 2 * 3 * 2 + 3 * 2  # bytes: 2 lengths x 3 kinds x 2 passes at cp = 2; activations: 3 kinds x cp 1, 2
    assert set(values) == {"0"}, report
    errors = re.findall(r"^\| \w+ \| \d+ \| \d+ \| (?:yes|no) \| ([0-9.e+-]+) \|$", report, flags=re.M)
    assert len(errors) == 2 * 3 and max(map(float, errors)) <= 1e-12, report  # cp = 1, 2 x 3 kinds: == serial GPT


def test_speed_bench_runs(tmp_path):
    report = run_bench("speed.py", tmp_path, "--no-torch")
    for section in ("One GPT block", "The MLP", "Strong scaling", "GEMMs alone: whole → one shard per rank",
                    "all-reduce bandwidth", "cProfile"):
        assert section in report
    assert (tmp_path / "speed.png").exists() or not PLOTS


def test_overlap_bench_runs(tmp_path):
    report = run_bench("overlap.py", tmp_path)
    for mode in ("| blocking |", "| overlap |", "| overlap, calls |", "| ZeRO-1 |", "| ZeRO-1 overlap |"):
        assert report.count(mode) == 2, report  # two meshes in --quick
    assert (tmp_path / "overlap.png").exists() and "overlap.png" in report


@pytest.mark.parametrize("t", [1, 2, 4])
def test_one_tensor_parallel_ranks_gemms_are_a_t_th_of_the_blocks(t):
    """The scaling ceiling replays one rank's GEMMs: t of them must hold exactly the block's FLOPs, GEMM
    by GEMM (one of each GEMM's dimensions, or its batch of heads, split t ways)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed_blas
    finally:
        sys.path.remove(str(BENCHMARKS))
    whole, shard = speed_blas.block_gemms(8, 2, 16, 4), speed_blas.block_gemms(8, 2, 16, 4, t=t)
    assert t * speed_blas.gemm_flops(shard) == speed_blas.gemm_flops(whole)
    for (name, batch, *mkn), (shard_name, shard_batch, *shard_mkn) in zip(whole, shard):
        assert name == shard_name
        assert numpy.prod(batch) * numpy.prod(mkn) == t * numpy.prod(shard_batch) * numpy.prod(shard_mkn)


def test_the_pytorch_block_computes_minitps_block():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed_block
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
    leaves = speed_block.torch_leaves(torch, block)
    actual = speed_block.torch_block(torch, leaves, torch.tensor(x), heads=3, dropout=0.0).detach().numpy()
    assert numpy.abs(actual - expected).max() <= 1e-12


def test_collectives_bench_compares_every_op_with_raw_mpi(tmp_path):
    report = run_bench("collectives.py", tmp_path)
    assert report.count("**") >= 2 * 5 * 2  # 2 sizes x 5 ops (in place and send_recv included), each ratio in bold
    assert "Largest ratio" in report and "raw / minitp" in report and "send_recv: raw / minitp" in report
    assert "Fixed cost per call" in report


def test_zero_bench_matches_the_formulas(tmp_path):
    """Every ZeRO stage's parameter, gradient, optimizer and wire bytes per rank equal their formulas at
    d = 1, 2; stage 3 sends 1.5 times the all-reduce; the stage-3 step's gathers and frees are listed."""
    report = run_bench("zero.py", tmp_path)
    values = unexplained(report)
    assert len(values) == 2 * 4 and set(values) == {"0"}, report
    assert "stage 3 1.500×" in report and "G b0 F b0" in report, report


def test_experts_bench_matches_the_formula(tmp_path):
    """The all-to-all bytes of a MoE layer equal 4·h·e·Σ_(i≠j) C[i, j] exactly (no unexplained byte)."""
    report = run_bench("experts.py", tmp_path)
    rows = re.findall(r"^\| 2 \| 2 \| [12] \| [\w.]+ \| \d+ \| \d+ \| ([\d,]+) \| ([\d,]+) \| [\d,]+ \| [\d.]+ \| (-?[\d,]+) \|",
                      report, flags=re.M)
    assert len(rows) == 3 and all(measured == exact and left == "0" for measured, exact, left in rows), report
    assert "Tokens per expert" in report and "Dropped share" in report
    assert (tmp_path / "experts.png").exists() or not PLOTS


def test_precision_bench_matches_the_formulas(tmp_path):
    """float32, bf16 and fp16 at d = 1, 2: parameters, gradients (end of backward) and optimizer state per
    rank equal 4Ψ + 4Ψ + 8Ψ and 2Ψ + 2Ψ + 12Ψ -- 16 bytes per parameter either way."""
    report = run_bench("precision.py", tmp_path)
    values = unexplained(report)
    assert len(values) == 2 * 3, report  # d = 1, 2 x three policies
    assert set(values) == {"0"}, report
    per_parameter = re.findall(r"^\| cpu \| \d \| (?:float32|bf16|fp16) \|(?: [^|]+ \|){7} (\d+) \|", report, flags=re.M)
    assert per_parameter == ["16"] * 6, report
    assert (tmp_path / "precision.png").exists() or not PLOTS
