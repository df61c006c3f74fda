"""tutorials/context_parallel.py runs to the end under mpiexec on 1, 2 and 4 ranks and passes its own check:
ring attention (contiguous and zigzag) and Ulysses equal serial causal attention forward and backward,
the zigzag GPT equals the serial GPT (within 1e-12), the bytes equal their formulas and zigzag balances
the work. On 3 ranks (16 tokens do not make 2·3 chunks) every rank stops before any collective."""
import pytest

from tutorial_runner import assert_stops_before_any_collective, assert_verdict, launch, needs_mpiexec, rank_lines

VERDICT = "check: ring (contiguous, zigzag) and Ulysses attention == serial"


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_tutorial_proves_its_claims(ranks, device):
    run = launch("context_parallel.py", ranks=ranks, device=device)
    assert_verdict(run, VERDICT, ranks)
    # per-rank listings, every rank once in rank order: the tokens held (1), each ring step (cp of them)
    assert rank_lines(run.stdout) == list(range(ranks)) * (1 + ranks)
    assert "zigzag    : the busiest rank attends 1.00×" in run.stdout, run.stdout


@needs_mpiexec
def test_tutorial_says_when_sizes_do_not_divide():
    assert_stops_before_any_collective(launch("context_parallel.py", ranks=3), 3, "This tutorial runs on 1, 2 or 4 ranks")
