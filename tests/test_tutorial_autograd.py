"""The serial tutorial runs to the end and passes its own checks (loss down, gradcheck <= 1e-6)."""
from tutorial_runner import launch


def test_autograd_tutorial_runs():
    # A fresh interpreter, outside any MPI launch: the tutorial is serial and must run as a learner runs it.
    run = launch("autograd.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: the loss went down" in run.stdout, run.stdout
