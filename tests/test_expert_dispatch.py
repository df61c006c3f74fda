"""The experts' exchanges: comm.all_to_all_v against numpy on every rank's rows, its bytes in the log, and the
dispatch Function's adjoint -- ⟨F x, y⟩ = ⟨x, F* y⟩ over all ranks, F* the exchange with the counts swapped
(its backward) -- on 1, 2, 3 and 4 ranks, uneven counts and empty blocks included."""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Tensor, comm
from minitp.parallel.expert.dispatch import AllToAllV, exchange_counts

WORLD = MPI.COMM_WORLD
H = 3


def world():
    return comm.Group(WORLD, "world")


def count_matrix(n, seed=0):
    """counts[i, j]: rows rank i sends rank j -- uneven, some zero; the same on every rank."""
    counts = numpy.random.default_rng(seed).integers(0, 4, (n, n))
    counts[0, -1] = 0
    return counts


def rows(rank, count, seed):
    return numpy.random.default_rng([seed, rank]).standard_normal((count, H))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_all_to_all_v_sends_each_rank_its_rows():
    n, rank = WORLD.size, WORLD.rank
    counts = count_matrix(n)
    mine = rows(rank, counts[rank].sum(), 1)
    with comm.log_collectives() as log:
        got = comm.all_to_all_v(mine, world(), counts[rank], counts[:, rank], tag="dispatch")
    # from rank i: its block for `rank`, rows [sum(counts[i, :rank]), ... + counts[i, rank])
    expected = numpy.concatenate([rows(i, counts[i].sum(), 1)[counts[i, :rank].sum():counts[i, :rank + 1].sum()]
                                  for i in range(n)])
    parallel_assert(numpy.array_equal(got, expected), f"{got} vs {expected}")
    (record,) = log.records
    sent = (counts[rank].sum() - counts[rank, rank]) * H * 8
    parallel_assert(record.op == "all_to_all_v" and record.ring_bytes == sent, f"{record} vs {sent}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_dispatch_is_adjoint_to_its_backward():
    """F moves rows by the counts; its backward F* moves rows by the counts swapped. Summed over the ranks,
    ⟨F x, y⟩ = ⟨x, F* y⟩ for random x and y, to rounding."""
    n, rank, group = WORLD.size, WORLD.rank, world()
    counts = count_matrix(n, seed=5)
    x = Tensor(rows(rank, counts[rank].sum(), 2), requires_grad=True)
    y = rows(rank, counts[:, rank].sum(), 3)  # a cotangent of F x's shape
    Fx = AllToAllV.apply(x, group=group, send_counts=counts[rank], receive_counts=counts[:, rank], tag="adjoint")
    Fx.backward(y)  # x.grad = F* y
    left = WORLD.allreduce(float(numpy.vdot(Fx.data, y)))
    right = WORLD.allreduce(float(numpy.vdot(x.data, x.grad)))
    parallel_assert(abs(left - right) <= 1e-12 * max(1.0, abs(left)), f"{left} vs {right}")
    parallel_assert(n == 1 or abs(left) > 1e-3, "something moved")


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_counts_go_first():
    """exchange_counts: rank j receives, from each source, the rows for each of its E/ep experts."""
    n, rank = WORLD.size, WORLD.rank
    E = 2 * n
    per_rank = [numpy.arange(E) + 10 * r for r in range(n)]  # rank r sends e + 10r rows to expert e
    arrived = exchange_counts(per_rank[rank], world())
    expected = numpy.stack([per_rank[i][2 * rank:2 * rank + 2] for i in range(n)])
    parallel_assert(numpy.array_equal(arrived, expected), f"{arrived} vs {expected}")


@pytest.mark.parallel(nprocs=[2, 3])
def test_bad_counts_are_refused_before_communicating():
    with comm.log_collectives() as log:
        try:
            comm.all_to_all_v(numpy.zeros((WORLD.size + 1, H)), world(), [1] * WORLD.size, [1] * WORLD.size)
            error = None
        except ValueError as raised:
            error = str(raised)
    parallel_assert(error is not None and "add up" in error and len(log) == 0, f"{error}")
