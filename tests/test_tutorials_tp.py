"""The tensor-parallel tutorials run to the end under mpiexec on 1, 2 and 4 ranks and pass their own check.

Each tutorial ends with a one-line verdict, printed only when the sharded module's output and every
gradient equal the serial module's within 1e-12 and the collective count is as designed (it exits 1
otherwise, on every rank). These tests launch them as a learner does, ``mpiexec -n N python tutorials/...``,
in fresh processes outside any MPI job this test may itself be running in (tutorial_runner.py).
"""
import pytest

from tutorial_runner import assert_stops_before_any_collective, assert_verdict, launch, needs_mpiexec, rank_lines

VERDICTS = {
    "mlp.py": "check: sharded MLP == serial MLP",
    "attention.py": "check: head-parallel attention == serial MultiHeadAttention",
}


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("tutorial", sorted(VERDICTS))
def test_tutorial_proves_sharded_equals_serial(tutorial, ranks, device):
    run = launch(tutorial, ranks=ranks, device=device)
    # the verdict is the last line, printed once, for this many ranks, and the error it reports is
    # rounding error, as the tutorial claims
    assert_verdict(run, VERDICTS[tutorial], ranks)
    # each per-rank listing (3 in mlp.py, 3 in attention.py) names every rank once, in rank order
    listings = {"mlp.py": 3, "attention.py": 3}[tutorial]
    assert rank_lines(run.stdout) == list(range(ranks)) * listings


@needs_mpiexec
def test_tutorial_says_when_sizes_do_not_divide():
    # hidden = 12 and ffn = 48 do not divide over 5 ranks: every rank must stop before any collective
    # (no hang: the 60 s timeout would fail the test) and rank 0 must say why, once.
    assert_stops_before_any_collective(launch("mlp.py", ranks=5), 5)
