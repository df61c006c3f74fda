"""minitp.comm's exchanges for context parallelism: sendrecv to ring neighbours and all_to_all, against
numpy on every rank's data, and their records in the collective log (the bytes this rank sends)."""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm

WORLD = MPI.COMM_WORLD


def rank_array(rank, shape, dtype="float64"):
    """Rank ``rank``'s data: any rank can rebuild any other rank's array."""
    return numpy.random.default_rng(200 + rank).standard_normal(shape).astype(dtype)


def world():
    return comm.Group(WORLD, "world")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sendrecv_passes_blocks_around_the_ring(dtype):
    group, n, rank = world(), WORLD.size, WORLD.rank
    mine = rank_array(rank, (3, 2, 5), dtype)
    with comm.log_collectives() as log:
        received = comm.sendrecv(mine, group, (rank + 1) % n, (rank - 1) % n, tag="ring step")
    parallel_assert(numpy.array_equal(received, rank_array((rank - 1) % n, (3, 2, 5), dtype)),
                    "the previous rank's block")
    (record,) = log.records
    parallel_assert((record.op, record.group, record.shape, record.tag) == ("sendrecv", "world", (3, 2, 5), "ring step"))
    parallel_assert(record.payload_bytes == record.ring_bytes == mine.nbytes, f"sends its whole block: {record}")
    parallel_assert(n > 1 or received is mine, "alone: itself, no copy")


@pytest.mark.parallel(nprocs=[2])
def test_a_ring_step_takes_only_a_ring_block_not_another_message_already_waiting():
    """Before: the receive matched ANY_TAG, so a message of another kind already waiting on the same
    communicator (here a same-sized one with tag 5) was taken for the neighbour's ring block."""
    communicator = WORLD.Dup()
    group, rank = comm.Group(communicator, "cp"), communicator.rank
    stray = numpy.full(4, -1.0)
    communicator.Isend(stray, dest=1 - rank, tag=5).Wait()  # small: sent eagerly, it waits at the receiver
    communicator.Barrier()
    received = comm.sendrecv(numpy.full(4, float(rank)), group, 1 - rank, 1 - rank)
    left_over = numpy.empty(4)
    communicator.Recv(left_over, source=1 - rank, tag=5)
    communicator.Free()
    parallel_assert(numpy.array_equal(received, numpy.full(4, float(1 - rank))), f"took {received}")
    parallel_assert(numpy.array_equal(left_over, stray))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("split_axis, concat_axis", [(1, 2), (2, 1), (0, 0), (-1, 0)])
def test_all_to_all_sends_block_j_to_rank_j(split_axis, concat_axis):
    group, n, rank = world(), WORLD.size, WORLD.rank
    shape = [2, 3, 4]
    shape[split_axis] *= n  # n blocks along split_axis
    mine = rank_array(rank, shape)
    with comm.log_collectives() as log:
        result = comm.all_to_all(mine, group, split_axis, concat_axis, tag="ulysses")
    # from rank i: its block `rank` along split_axis; concatenated along concat_axis in rank order
    expected = numpy.concatenate([numpy.split(rank_array(i, shape), n, axis=split_axis)[rank] for i in range(n)],
                                 axis=concat_axis)
    parallel_assert(result.shape == expected.shape and numpy.array_equal(result, expected),
                    f"{result.shape} vs {expected.shape}")
    (record,) = log.records
    parallel_assert(record.op == "all_to_all" and record.payload_bytes == mine.nbytes)
    parallel_assert(record.ring_bytes == (n - 1) * mine.nbytes / n, f"keeps its own block: {record}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_all_to_all_and_back_is_the_identity():
    group, n = world(), WORLD.size
    x = rank_array(WORLD.rank, (2, 4 * n, 3, 5))  # (b, heads, s/n, d): split heads, gather the sequence
    there = comm.all_to_all(x, group, split_axis=1, concat_axis=2)
    parallel_assert(there.shape == (2, 4, 3 * n, 5), f"{there.shape}")
    back = comm.all_to_all(there, group, split_axis=2, concat_axis=1)
    parallel_assert(numpy.array_equal(back, x), "the inverse all-to-all swaps the axes back")


@pytest.mark.parallel(nprocs=[2, 3])
def test_all_to_all_refuses_an_axis_it_cannot_split_before_communicating():
    x = numpy.zeros((2, WORLD.size + 1, 3))
    with comm.log_collectives() as log:
        try:
            comm.all_to_all(x, world(), 1, 2)
            error = None
        except ValueError as raised:
            error = str(raised)
    parallel_assert(error is not None and "not divisible" in error and len(log) == 0, f"{error}")
