"""minitp.report: rank 0 speaks for everyone, per-rank lines come out in rank order, and a verdict is
the same on every rank -- one failing rank stops them all.

What each rank prints is read with capsys on that rank: only rank 0 may print anything.
"""
import time

import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm, report

WORLD = MPI.COMM_WORLD


def printed(capsys):
    return capsys.readouterr().out


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_say_prints_once_from_rank_0(capsys):
    report.say(f"from rank {WORLD.rank}")
    report.banner("a title")
    out = printed(capsys)
    expected = ("from rank 0\n"
                f"minitp: a title | arrays: numpy (CPU) | MPI: {comm.transport()}\n") if WORLD.rank == 0 else ""
    parallel_assert(out == expected, f"rank {WORLD.rank} printed {out!r}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_each_rank_prints_every_rank_once_in_rank_order(capsys):
    # the ranks arrive in reverse order: the lines must still come out in rank order
    time.sleep(0.02 * (WORLD.size - 1 - WORLD.rank))
    report.each_rank(f"holds {10 * WORLD.rank + 7}")
    out = printed(capsys)
    expected = "".join(f"   rank {r}: holds {10 * r + 7}\n" for r in range(WORLD.size)) if WORLD.rank == 0 else ""
    parallel_assert(out == expected, f"rank {WORLD.rank} printed {out!r}")


def exit_code(ok, message, failure=None):
    """What ``report.verdict`` did on this rank: None when it returned, else its SystemExit's code (caught
    here, so that every rank reaches the parallel_assert that follows)."""
    try:
        report.verdict(ok, message, failure)
    except SystemExit as stop:
        return stop.code
    return None


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_verdict_is_the_same_on_every_rank(capsys):
    code = exit_code(True, "all ranks agree", failure="never printed")
    out = printed(capsys)
    parallel_assert(code is None, f"every rank passed, yet rank {WORLD.rank} exited with {code!r}")
    parallel_assert(out == ("check: all ranks agree\n" if WORLD.rank == 0 else ""), f"rank {WORLD.rank}: {out!r}")

    # one failing rank stops every rank: the first (which prints the verdict) or the last (which does not)
    for failing_rank in sorted({0, WORLD.size - 1}):
        code = exit_code(WORLD.rank != failing_rank, "all ranks agree", failure=f"rank {failing_rank} disagrees")
        out = printed(capsys)
        parallel_assert(code not in (None, 0), f"rank {failing_rank} failed, yet rank {WORLD.rank} did not stop "
                                               f"(exit code {code!r})")
        expected = f"check: FAILED: rank {failing_rank} disagrees\n" if WORLD.rank == 0 else ""
        parallel_assert(out == expected, f"rank {WORLD.rank} printed {out!r}")

    # without a failure text, the failure names the claim that did not hold
    code = exit_code(WORLD.rank != WORLD.size - 1, "the claim")
    out = printed(capsys)
    parallel_assert(code not in (None, 0), f"rank {WORLD.rank}: exit code {code!r}")
    parallel_assert(out == ("check: FAILED: the claim\n" if WORLD.rank == 0 else ""), f"rank {WORLD.rank}: {out!r}")


def test_indent_and_ranks():
    table = "op  bytes\nall_reduce  96\n"
    assert report.indent(table) == report.INDENT + "op  bytes\n" + report.INDENT + "all_reduce  96"
    assert [report.ranks(n) for n in (1, 2, 4)] == ["1 rank", "2 ranks", "4 ranks"]
