"""Which mistakes are refused always, and which only in checked mode (``comm.init(checked=True)``)?

The suite runs in checked mode (conftest.py); the tests of the always-on checks here turn it OFF, so
that they show what a user who never heard of checked mode gets:

- always (local: nothing is sent, one comparison): the full sequence fed to a sequence-parallel block
  (or its LayerNorm, its g, the tied head's g) that knows its model's ``seq_len``, when that sequence is
  longer than seq_len/t tokens -- which a full-length batch always is. Before, the block returned a
  result right on rank 0's rows and wrong on ranks 1..t-1, with no error. Every valid block of every
  sequence of at most seq_len tokens still passes.
- only in checked mode (it takes one small allgather per collective: no rank can see these alone):
  ranks that call different collectives at one point (an all-reduce here, an all-gather there; a
  non-blocking op and its blocking twin), an all-to-all whose ranks pass different shapes, a full
  sequence short enough to look like a block. (Uneven all-gather shards and dtypes that differ across
  ranks: test_disagreement.py.) Before, each hung or returned garbage.

Every error is raised on every rank, before any collective of the algorithm (parallel_assert: no rank
fails alone; pytest-timeout: no hang).
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.autograd import Tensor
from minitp.comm import checks
from minitp.parallel import ParallelTransformerBlock, SequenceParallelLayerNorm, mappings
from minitp.parallel.tensor.builders import TensorParallelLayers
from parallel_helpers import value_error as raised  # (message or None, collectives logged before it)

WORLD = MPI.COMM_WORLD
F64 = numpy.float64


def random(shape, seed):
    return numpy.random.default_rng(seed).standard_normal(shape)


@pytest.fixture
def unchecked():
    """Checked mode off for one test (the suite turns it on), restored after."""
    was = checks.checked()
    checks.set_checked(False)
    yield
    checks.set_checked(was)


# -- always on: a sequence-parallel layer that knows seq_len -----------------------------------------

@pytest.mark.parallel(nprocs=[2, 4])
def test_the_full_sequence_into_a_sequence_parallel_block_is_refused_without_checked_mode(unchecked):
    tp = comm.init(tp=WORLD.size).tp
    t, seq_len = tp.size, 4 * tp.size
    block = ParallelTransformerBlock(8, 2 * t, group=tp, sequence_parallel=True, dtype=F64, seq_len=seq_len)
    full = random((seq_len, 2, 8), 3)  # a full-length batch, the same on every rank: the mistake
    message, collectives = raised(lambda: block(Tensor(full)))
    parallel_assert(message is not None and "ParallelTransformerBlock" in message
                    and f"shape {full.shape}" in message and f"at most {seq_len // t}" in message
                    and "full sequence" in message and f"rank {tp.rank} of {t}" in message, f"{message}")
    parallel_assert(collectives == 0, "refused before any collective")
    # sound: this rank's block of every sequence the model takes (s <= seq_len, a multiple of t) passes
    for seq in range(t, seq_len + 1, t):
        mine = numpy.ascontiguousarray(comm.split(full[:seq], tp, 0))
        parallel_assert(block(Tensor(mine)).shape == mine.shape, f"a valid block of {seq} tokens was refused")


@pytest.mark.parallel(nprocs=[2, 3])
@pytest.mark.parametrize("where", ["layernorm", "g", "tied head"])
def test_every_sequence_parallel_entry_that_knows_seq_len_refuses_the_full_sequence(unchecked, where):
    tp = comm.init(tp=WORLD.size).tp
    seq_len, hidden = 2 * tp.size, 4
    x = Tensor(random((seq_len, 2, hidden), 1))  # the full sequence: (s, b, h) where (s/t, b, h) belongs
    if where == "layernorm":
        layer = SequenceParallelLayerNorm(hidden, group=tp, dtype=F64, tag="ln1", seq_len=seq_len)
        call, name = lambda: layer(x), "SequenceParallelLayerNorm 'ln1'"
    elif where == "g":
        call, name = lambda: mappings.gather_from_sequence_parallel_region(x, tp, "qkv", seq_len=seq_len), "qkv: g"
    else:
        layers = TensorParallelLayers(tp, sequence_parallel=True, seq_len=seq_len)
        call, name = lambda: layers.tied_logits(x, Tensor(random((3, hidden), 2))), "lm_head (tied)"
    message, collectives = raised(call)
    parallel_assert(message is not None and name in message and f"at most {seq_len // tp.size}" in message,
                    f"{message}")
    parallel_assert(collectives == 0, "refused before any collective")


# -- only in checked mode: what no rank can see alone ---------------------------------------------------

@pytest.mark.parallel(nprocs=[2, 3])
@pytest.mark.parametrize("other", ["all_gather", "iall_reduce"])
def test_ranks_that_call_different_collectives_are_refused_in_checked_mode(other):
    """Rank 0 all-reduces while the others all-gather (or start the non-blocking all-reduce, which MPI
    never matches with the blocking one): the same shape and dtype everywhere. Before: a hang."""
    group = comm.Group(WORLD, "world")
    x = numpy.ones((2, 3))
    if WORLD.rank == 0:
        call = lambda: comm.all_reduce(x, group)  # noqa: E731
    elif other == "all_gather":
        call = lambda: comm.all_gather(x, group)  # noqa: E731
    else:
        call = lambda: comm.iall_reduce(x, group).wait()  # noqa: E731
    message, _ = raised(call)
    parallel_assert(message is not None and "rank 0 passed all_reduce of shape (2, 3)" in message
                    and f"rank 1 passed {other} of shape (2, 3)" in message, f"{message}")
    parallel_assert(comm.all_reduce(numpy.ones(1), group)[0] == WORLD.size, "the ranks are still in step")


@pytest.mark.parallel(nprocs=[2, 3])
def test_an_all_to_all_whose_ranks_disagree_is_refused_in_checked_mode():
    """Before: no check at all for all_to_all -- garbage, a truncation error on some ranks, or a hang."""
    group = comm.Group(WORLD, "world")
    x = numpy.ones((2 * WORLD.size, 3 + (WORLD.rank == 1)))  # rank 1's blocks are one column wider
    message, _ = raised(lambda: comm.all_to_all(x, group, split_axis=0, concat_axis=1))
    parallel_assert(message is not None and "all_to_all" in message and "rank 1 passed" in message, f"{message}")
    parallel_assert(comm.all_reduce(numpy.ones(1), group)[0] == WORLD.size, "the ranks are still in step")


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("seq_len", [None, 8])
def test_a_full_sequence_too_short_for_the_local_check_needs_checked_mode(seq_len):
    """A full sequence of at most seq_len/t tokens (or any, without seq_len) looks exactly like a block:
    the local check lets it through, checked mode's not_replicated refuses it (every rank passed it)."""
    tp = comm.init(tp=WORLD.size).tp
    block = ParallelTransformerBlock(8, 2 * tp.size, group=tp, sequence_parallel=True, dtype=F64,
                                     seq_len=None if seq_len is None else seq_len * tp.size)
    full = random((8, 2, 8), 3)  # 8 tokens: at most seq_len/t, the same on every rank
    message, _ = raised(lambda: block(Tensor(full)))
    parallel_assert(message is not None and "the same array" in message and "full sequence" in message,
                    f"{message}")
