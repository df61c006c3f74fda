"""Point-to-point (minitp.comm.p2p): what the pipeline stages exchange.

- the stage shift and its adjoint: F sends each stage's x to the next (stage 0 receives nothing), F*
  sends each stage's y to the previous; ⟨F x, y⟩ = ⟨x, F* y⟩ summed over the stages (distdl's adjoint
  test), which is why a pipeline's backward sends gradients the other way;
- two neighbours that both send a large buffer before receiving do not deadlock (the sends are posted
  non-blocking), and messages pair by tag whatever order they were posted in;
- every send and receive is in the collective log with its bytes; a receive of the wrong shape is
  refused.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm

WORLD = MPI.COMM_WORLD


def shift(x, group, forward):
    """x of stage r goes to stage r+1 (forward) or r-1 (backward); the stage at the end receives zeros."""
    r, p = group.rank, group.size
    dest, source = (r + 1, r - 1) if forward else (r - 1, r + 1)
    pending = [comm.send(x, group, dest, match=0)] if 0 <= dest < p else []
    received = comm.recv(x.shape, x.dtype, group, source, match=0) if 0 <= source < p else numpy.zeros_like(x)
    comm.wait_all(pending)
    return received


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_the_backward_shift_is_the_adjoint_of_the_forward_shift():
    pp = comm.init(tp=1, pp=WORLD.size).pp
    x = numpy.random.default_rng([1, pp.rank]).standard_normal((3, 2, 5))
    y = numpy.random.default_rng([2, pp.rank]).standard_normal((3, 2, 5))
    left = WORLD.allreduce(float(numpy.vdot(shift(x, pp, forward=True), y)))
    right = WORLD.allreduce(float(numpy.vdot(x, shift(y, pp, forward=False))))
    parallel_assert(abs(left - right) <= 1e-12 * max(1.0, abs(left)), f"<Fx, y> = {left}, <x, F*y> = {right}")
    parallel_assert(WORLD.size == 1 or abs(left) > 0, "something crossed the wire")


@pytest.mark.parallel(nprocs=[2])
def test_crossing_sends_of_large_buffers_do_not_deadlock_and_pair_by_tag():
    pp = comm.init(tp=1, pp=2).pp
    other = 1 - pp.rank
    big = [numpy.full(2 ** 20, float(10 * pp.rank + k)) for k in range(2)]  # 8 MiB each: past any eager limit
    with comm.log_collectives() as log:
        pending = [comm.send(big[k], pp, other, match=k) for k in range(2)]  # both ranks send first
        second = comm.recv(big[1].shape, big[1].dtype, pp, other, match=1)  # taken in the other order
        first = comm.recv(big[0].shape, big[0].dtype, pp, other, match=0)
        comm.wait_all(pending)
    parallel_assert(first[0] == 10 * other and second[0] == 10 * other + 1, f"paired by tag: {first[0]}, {second[0]}")
    sends, receives = log.select("send"), log.select("recv")
    parallel_assert(len(sends) == len(receives) == 2 and all(r.payload_bytes == 8 * 2 ** 20 for r in log),
                    log.table())
    parallel_assert(log.total_ring_bytes("send") == 2 * 8 * 2 ** 20 and log.total_ring_bytes("recv") == 0,
                    "a send's ring bytes are what it sends; a receive sends nothing")


@pytest.mark.parallel(nprocs=[2])
def test_a_receive_of_another_shape_is_refused():
    pp = comm.init(tp=1, pp=2).pp
    errors = []
    for size in (3, 6):  # fewer elements than the receiver expects, then more
        if pp.rank == 0:
            comm.wait_all([comm.send(numpy.zeros(size), pp, 1, match=3)])
            continue
        try:
            comm.recv((2, 2), numpy.float64, pp, 0, match=3)
            errors.append(None)
        except ValueError as raised:
            errors.append(str(raised))
    parallel_assert(pp.rank == 0 or all(e is not None and "disagree on the shape" in e for e in errors), f"{errors}")
