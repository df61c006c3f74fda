"""minitp.comm.nonblocking: each non-blocking collective returns exactly what its blocking twin returns,
is logged with the same bytes, and -- with the progress thread -- completes while the rank is busy with
something other than MPI."""
import time

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.comm import nonblocking

WORLD = MPI.COMM_WORLD


def world():
    return comm.Group(WORLD, "world")


@pytest.fixture(params=nonblocking.PROGRESS_MODES)
def progress(request):
    previous = nonblocking.progress()
    comm.set_progress(request.param)
    yield request.param
    comm.set_progress(previous)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_each_equals_its_blocking_twin_with_the_same_log(progress):
    group = world()
    x = numpy.random.default_rng(WORLD.rank).standard_normal((4 * group.size, 3))
    with comm.log_collectives() as blocking:
        expected = [comm.all_reduce(x, group), comm.reduce_scatter(x, group), comm.all_gather(x, group)]
    with comm.log_collectives() as started:
        pending = [comm.iall_reduce(x, group), comm.ireduce_scatter(x, group), comm.iall_gather(x, group)]
    results = [p.wait() for p in reversed(pending)][::-1]  # waited for in another order than started
    parallel_assert(all(numpy.array_equal(a, b) for a, b in zip(results, expected)), f"{progress}: the same values")
    summary = [(r.op, r.shape, r.payload_bytes, r.ring_bytes) for r in started]
    parallel_assert(summary == [(r.op, r.shape, r.payload_bytes, r.ring_bytes) for r in blocking], str(summary))
    parallel_assert(all(not r.blocking for r in started) and all(r.blocking for r in blocking), "blocking flags")


@pytest.mark.parallel(nprocs=[2])
def test_the_progress_thread_completes_a_collective_while_the_rank_does_no_mpi(progress):
    group = world()
    x = numpy.ones(1 << 16)
    pending = comm.iall_reduce(x, group)
    time.sleep(0.2)  # no MPI call on this thread: only the progress thread can move the bytes
    completed_before_wait = pending.completed is not None
    total = pending.wait()
    parallel_assert(numpy.array_equal(total, 2 * x), "the sum")
    if progress == "thread":
        parallel_assert(completed_before_wait, "the progress thread saw it complete during the sleep")
    with pytest.raises(RuntimeError, match="already"):
        pending.wait()


@pytest.mark.parallel(nprocs=[2])
def test_bad_arguments_are_refused_before_any_communication():
    with pytest.raises(ValueError, match="progress"):
        comm.set_progress("sometimes")
    with comm.log_collectives() as log:
        with pytest.raises(ValueError, match="not divisible by 2"):
            comm.ireduce_scatter(numpy.ones(3), world())
    parallel_assert(len(log) == 0, "nothing started")
