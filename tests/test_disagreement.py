"""Inputs that used to give a silent wrong answer across ranks now give one clear error, on every rank,
before any collective of the algorithm runs (minitp.comm.checks and the layers' input checks):

- an activation of the wrong shape for a parallel layer's mode (full width into a row-parallel layer
  that expects its columns, no batch axis, the full sequence into a sequence-parallel block);
- token ids or targets that differ across the tensor-parallel group (a per-rank data seed);
- collectives whose ranks pass different shapes or dtypes (checked mode, on in this suite).

Which of these only checked mode catches, and what the always-on local checks refuse with it off:
test_unchecked_mistakes.py.

Each error is caught on every rank and compared: the same kind of message everywhere, and no rank left
waiting (a rank that did not raise would report it through parallel_assert; a hang fails on the timeout).
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.autograd import Tensor
from minitp.parallel import (ColumnParallelLinear, ParallelTransformerBlock, RowParallelLinear,
                             VocabParallelEmbedding, vocab_parallel_cross_entropy)
from parallel_helpers import value_error as raised  # (message or None, collectives logged before it)

WORLD = MPI.COMM_WORLD
F64 = numpy.float64


def random(shape, seed):
    return numpy.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parallel(nprocs=[2, 4])
def test_a_full_width_input_to_a_row_parallel_layer_names_the_layer_and_both_shapes():
    tp = comm.init(tp=WORLD.size).tp
    layer = RowParallelLinear(4 * tp.size, 3, group=tp, dtype=F64, tag="mlp fc2")
    message, collectives = raised(lambda: layer(Tensor(random((5, 2, 4 * tp.size), 1))))
    parallel_assert(message is not None and "mlp fc2" in message and f"(5, 2, {4 * tp.size})" in message
                    and "expected (s, b, 4)" in message, f"{message}")
    parallel_assert(collectives == 0, "refused before any collective")


@pytest.mark.parallel(nprocs=[1, 2])
def test_an_input_without_the_batch_axis_is_refused_by_name():
    tp = comm.init(tp=WORLD.size).tp
    layer = ColumnParallelLinear(6, 2 * tp.size, group=tp, dtype=F64, tag="attention qkv")
    message, collectives = raised(lambda: layer(Tensor(random((5, 6), 1))))
    parallel_assert(message is not None and "attention qkv" in message and "(5, 6)" in message
                    and "expected (s, b, 6)" in message, f"{message}")
    parallel_assert(collectives == 0)


@pytest.mark.parallel(nprocs=[2, 4])
def test_the_full_sequence_fed_to_a_sequence_parallel_block_is_refused_on_every_rank():
    """Before: it returned a result, right on rank 0's rows and wrong everywhere else."""
    tp = comm.init(tp=WORLD.size).tp
    block = ParallelTransformerBlock(8, 2 * tp.size, group=tp, sequence_parallel=True, dtype=F64)
    full = random((2 * tp.size, 2, 8), 3)  # the whole sequence, the same on every rank
    message, _ = raised(lambda: block(Tensor(full)))
    parallel_assert(message is not None and "full sequence" in message and "scatter" in message, f"{message}")
    # its own block of the sequence is accepted
    mine = comm.split(full, tp, 0)
    parallel_assert(block(Tensor(numpy.ascontiguousarray(mine))).shape == mine.shape)


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("where", ["embedding", "cross-entropy"])
def test_token_ids_that_differ_across_tp_name_the_cause_on_every_rank(where):
    """Before: one loss that matches no serial run (each rank embedded other tokens)."""
    tp = comm.init(tp=WORLD.size).tp
    ids = numpy.random.default_rng(WORLD.rank).integers(0, 4 * tp.size, (3, 2))  # a per-rank seed: the bug
    if where == "embedding":
        layer = VocabParallelEmbedding(4 * tp.size, 3, group=tp, dtype=F64, tag="wte")
        message, collectives = raised(lambda: layer(ids))
    else:
        logits = Tensor(random((3, 2, 4), 1))
        message, collectives = raised(lambda: vocab_parallel_cross_entropy(logits, ids, tp, tag="loss"))
    parallel_assert(message is not None and "disagree" in message and "checksum" in message
                    and "seed" in message and "rank 1 passed" in message, f"{message}")
    parallel_assert(collectives == 0, "refused before the algorithm's collectives")


@pytest.mark.parallel(nprocs=[2, 3])
@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter", "all_reduce", "broadcast",
                                "iall_gather", "ireduce_scatter", "iall_reduce"])
def test_collectives_whose_ranks_disagree_say_what_each_rank_passed(op):
    """Before: an all-gather of uneven arrays read uninitialised memory, a reduce-scatter of mixed dtypes
    returned NaN. Checked mode (on in this suite) compares shape and dtype first -- for the non-blocking
    twins too, before anything is in flight."""
    group = comm.Group(WORLD, "world")
    n = WORLD.size
    if op in ("all_gather", "all_reduce", "broadcast", "iall_gather", "iall_reduce"):
        x = numpy.ones((2 + (WORLD.rank == 1), 3))  # rank 1 passes one row more
    else:
        x = numpy.ones((2 * n, 3), dtype=numpy.float32 if WORLD.rank == 1 else numpy.float64)
    call = {"all_gather": lambda: comm.all_gather(x, group), "reduce_scatter": lambda: comm.reduce_scatter(x, group),
            "all_reduce": lambda: comm.all_reduce(x, group), "broadcast": lambda: comm.broadcast(x, group),
            "iall_gather": lambda: comm.iall_gather(x, group).wait(),
            "ireduce_scatter": lambda: comm.ireduce_scatter(x, group).wait(),
            "iall_reduce": lambda: comm.iall_reduce(x, group).wait()}[op]
    message, _ = raised(call)
    # a non-blocking op names its blocking twin (iall_reduce: "all_reduce"), as its log entry does
    parallel_assert(message is not None and op.removeprefix("i") in message and "rank 0 passed" in message
                    and "rank 1 passed" in message, f"{message}")
    parallel_assert(comm.all_reduce(numpy.ones(1), group)[0] == n, "the ranks are still in step")
