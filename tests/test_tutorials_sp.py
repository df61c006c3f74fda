"""The sequence-parallel tutorials run to the end under mpiexec on 1, 2 and 4 ranks and pass their own check.

Each tutorial ends with a one-line verdict, printed only when every rank agrees that its check holds
(it exits 1 otherwise, on every rank):

- sequence_parallel.py: sequence-parallel LayerNorm and dropout equal the serial layers within 1e-12,
  forward and backward; each rank's dropout mask is its rows of the serial mask; the bytes a block keeps
  for backward are the paper's formulas plus the terms it names; TP+SP's ring bytes equal TP's plus
  the re-gathers and the replicated gradients' all-reduces.
- transformer.py: the TP+SP block's output, input gradient and every parameter gradient equal the serial
  TransformerBlock's within 1e-12; every rank saw the same shapes; 2 all-gathers and 2 reduce-scatters
  forward, 2 re-gathers backward.

These tests launch them as a learner does, ``mpiexec -n N python tutorials/...``, in fresh processes
outside any MPI job this test may itself be running in.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_MPIEXEC = Path(sys.executable).parent / "mpiexec"  # the PyPI MPI's launcher, beside the venv's python
MPIEXEC = str(VENV_MPIEXEC) if VENV_MPIEXEC.exists() else shutil.which("mpiexec")  # or a system MPI's

VERDICTS = {
    "sequence_parallel.py": "check: sequence-parallel LayerNorm and dropout == serial",
    "transformer.py": "check: TP+SP block == serial TransformerBlock",
}

needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: neither the venv's (make venv) nor one on PATH")


def launch(tutorial, ranks, device="cpu"):
    """``mpiexec -n ranks python tutorials/<tutorial>``: the completed process (60 s at most)."""
    # Drop the variables of an MPI job we may be running inside (mpiexec -n N python -m pytest), so that
    # the inner mpiexec starts a job of its own instead of joining ours.
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "_PYTEST_MPI"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MINITP_DEVICE=device)
    command = [MPIEXEC, "-n", str(ranks), sys.executable, str(ROOT / "tutorials" / tutorial)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("tutorial", sorted(VERDICTS))
def test_tutorial_proves_its_claims(tutorial, ranks, device):
    run = launch(tutorial, ranks, device)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    # The verdict is the last line, printed once (by rank 0 only), for this many ranks.
    assert lines and lines[-1].startswith(VERDICTS[tutorial]), run.stdout + run.stderr
    assert run.stdout.count(VERDICTS[tutorial]) == 1, run.stdout
    assert lines[-1].endswith(f"on {ranks} rank{'s' * (ranks > 1)}"), lines[-1]
    # and the error it reports is rounding error, as the tutorial claims
    error = float(re.search(r"max error ([0-9.e+-]+)", lines[-1]).group(1))
    assert error <= 1e-12, lines[-1]
    if tutorial == "sequence_parallel.py":
        # five per-rank listings (LayerNorm, layouts, dropout masks, the forgotten sum, the check), each
        # naming every rank once, in rank order
        assert [int(r) for r in re.findall(r"^   rank (\d+): ", run.stdout, re.M)] == list(range(ranks)) * 5
    else:
        # two tables with one column per rank (the weights, the stages), headed rank 0 .. rank N-1
        headers = [line.split() for line in lines if re.match(r"^   (parameter|stage) ", line)]
        assert len(headers) == 2, run.stdout
        for header in headers:
            assert header[-2 * ranks:] == " ".join(f"rank {r}" for r in range(ranks)).split(), header


@needs_mpiexec
@pytest.mark.parametrize("tutorial", sorted(VERDICTS))
def test_tutorial_says_when_sizes_do_not_divide(tutorial):
    # seq = 12 does not divide over 5 ranks: every rank must stop before any collective (no hang: the
    # 60 s timeout would fail the test) and rank 0 must say why, once.
    run = launch(tutorial, 5)
    assert run.returncode != 0, run.stdout + run.stderr
    assert run.stdout.count("is not divisible by 5") == 1, run.stdout + run.stderr
    assert "check:" not in run.stdout, run.stdout
