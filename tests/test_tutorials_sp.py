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
outside any MPI job this test may itself be running in (tutorial_runner.py).
"""
import re

import pytest

from tutorial_runner import assert_stops_before_any_collective, assert_verdict, launch, needs_mpiexec, rank_lines

VERDICTS = {
    "sequence_parallel.py": "check: sequence-parallel LayerNorm and dropout == serial",
    "transformer.py": "check: TP+SP block == serial TransformerBlock",
}


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("tutorial", sorted(VERDICTS))
def test_tutorial_proves_its_claims(tutorial, ranks, device):
    run = launch(tutorial, ranks=ranks, device=device)
    # the verdict is the last line, printed once, for this many ranks, and the error it reports is
    # rounding error, as the tutorial claims
    assert_verdict(run, VERDICTS[tutorial], ranks)
    if tutorial == "sequence_parallel.py":
        # five per-rank listings (LayerNorm, layouts, dropout masks, the forgotten sum, the check), each
        # naming every rank once, in rank order
        assert rank_lines(run.stdout) == list(range(ranks)) * 5
    else:
        # two tables with one column per rank (the weights, the stages), headed rank 0 .. rank N-1
        lines = run.stdout.strip().splitlines()
        headers = [line.split() for line in lines if re.match(r"^   (parameter|stage) ", line)]
        assert len(headers) == 2, run.stdout
        for header in headers:
            assert header[-2 * ranks:] == " ".join(f"rank {r}" for r in range(ranks)).split(), header


@needs_mpiexec
@pytest.mark.parametrize("tutorial", sorted(VERDICTS))
def test_tutorial_says_when_sizes_do_not_divide(tutorial):
    # seq = 12 does not divide over 5 ranks: every rank must stop before any collective (no hang: the
    # 60 s timeout would fail the test) and rank 0 must say why, once.
    assert_stops_before_any_collective(launch(tutorial, ranks=5), 5)
