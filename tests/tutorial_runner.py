"""Run a tutorial as a learner does -- ``mpiexec -n N python tutorials/X.py``, or plain ``python`` -- and
read what it printed (test_tutorials_tp.py, test_tutorials_sp.py, test_tutorial_collectives.py,
test_tutorial_autograd.py, test_train_gpt.py).

Each launch is a fresh process outside any MPI job the test itself may be running in (``mpiexec -n N
python -m pytest``): the job's identity is dropped from the environment (``minitp.launcher.environment``),
so that an inner mpiexec starts a job of its own, and a plain python starts as a singleton, instead of
joining ours. The launcher and its flags are ``minitp.launcher.command``'s, as for every launch the tests make.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minitp import launcher

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
needs_mpiexec = pytest.mark.skipif(launcher.mpiexec() is None,
                                   reason="no mpiexec: neither $MPIEXEC, nor the venv's (make venv), nor one on PATH")


def launch(tutorial, *args, ranks=None, device="cpu", timeout=60, env=None):
    """The completed process of ``tutorials/<tutorial> args...``: under ``mpiexec -n ranks``, or with
    ``ranks=None`` as a plain script (MPI then starts a singleton, one rank). ``timeout`` seconds at most:
    a hang fails the test instead of blocking it. One BLAS thread per rank, on ``device`` (``"gpu"``
    without a GPU: the CuPy stand-in, which conftest.py put on PYTHONPATH); ``env``: more variables."""
    env = launcher.environment(dict(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MINITP_DEVICE=device, **(env or {})))
    command = [sys.executable, str(TUTORIALS / tutorial), *args]
    if ranks is not None:
        command = launcher.command(ranks) + command
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_verdict(completed, verdict, ranks):
    """The run passed its own check: exit status 0, and its last line is the verdict ``verdict...``,
    printed once (by rank 0 only), for this many ranks, quoting a max error of rounding size (<= 1e-12)."""
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert lines and lines[-1].startswith(verdict), completed.stdout + completed.stderr
    assert completed.stdout.count(verdict) == 1, completed.stdout
    assert lines[-1].endswith(f"on {ranks} rank{'s' * (ranks > 1)}"), lines[-1]
    error = float(re.search(r"max error ([0-9.e+-]+)", lines[-1]).group(1))
    assert error <= 1e-12, lines[-1]


def rank_lines(stdout):
    """The rank of every per-rank line ("   rank r: ..."), in the order printed."""
    return [int(r) for r in re.findall(r"^   rank (\d+): ", stdout, re.M)]


def assert_stops_before_any_collective(completed, ranks, why=None):
    """Sizes that do not divide over ``ranks``: every rank stopped (no hang: the launch's timeout would
    fail the test) with a non-zero status, rank 0 said why once (``why``; by default "is not divisible by
    <ranks>"), and no check ran."""
    assert completed.returncode != 0, completed.stdout + completed.stderr
    why = why or f"is not divisible by {ranks}"
    assert completed.stdout.count(why) == 1, completed.stdout + completed.stderr
    assert "check:" not in completed.stdout, completed.stdout
