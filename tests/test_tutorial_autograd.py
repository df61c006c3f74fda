"""The serial tutorial runs to the end and passes its own checks (loss down, gradcheck <= 1e-6)."""
import os
import subprocess
import sys
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parent.parent / "tutorials" / "autograd.py"


def test_autograd_tutorial_runs():
    # A fresh interpreter, outside any MPI launch: the tutorial is serial and must run as a learner runs it.
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PMI_", "OMPI_", "MPI_", "HYDRA_", "_PYTEST_MPI"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MINITP_DEVICE="cpu")
    run = subprocess.run([sys.executable, str(TUTORIAL)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: the loss went down" in run.stdout, run.stdout
