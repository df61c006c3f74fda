"""minitp.parallel: the vocab-parallel embedding and cross-entropy against their serial twins.

Every rank builds the full serial problem (the same seed gives the same table, logits and targets on every
rank), runs the serial op, and compares it with its shard of the parallel op: outputs and gradients
gathered over the ranks must equal the serial ones within 1e-12 in float64. Vocabulary sizes are not
powers of two: V=12 splits over 1, 2, 3 and 4 ranks, V=30 over 1, 2 and 3.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp import functional as F
from minitp.autograd import Tensor
from minitp.nn.layers import Embedding
from minitp.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from minitp.parallel.tensor.embedding import VocabParallelEmbedding
from minitp.parallel.tensor.shard import gather_serial_state
from minitp.testing import gradcheck, max_error

WORLD = MPI.COMM_WORLD
SAME = 1e-12  # serial vs sharded in float64: sums in another order, rounding only
GRADCHECK = 1e-6

# (vocab, rank counts it divides); the rank count of the run picks the cases that apply
VOCABS = [(12, [1, 2, 3, 4]), (30, [1, 2, 3])]
# ids / targets shapes (s, b): odd sizes, and seq 1 per rank with batch 1 (s is a multiple of every
# rank count up to 4 so that sequence parallelism can split it)
TOKENS = [(12, 3), (12, 1)]


def tp_group():
    return comm.init(tp=WORLD.size).tp


def vocab_cases():
    return [pytest.param(vocab, marks=pytest.mark.skipif(WORLD.size not in ranks, reason=f"V={vocab} needs {ranks}"))
            for vocab, ranks in VOCABS]


def token_ids(shape, vocab, seed=0):
    """Ids covering every rank's range, with repeats (a row looked up twice gets two gradients)."""
    return numpy.random.default_rng(seed).integers(0, vocab, shape)


def gathered_rows(shard, group):
    """The full array from the ranks' blocks along axis 0 (the parameter's ``split_axis``)."""
    return comm.all_gather(numpy.ascontiguousarray(shard), group, axis=0)


def raised_on_this_rank(exception, fn):
    """The ``exception`` that ``fn()`` raised here, or None: ``pytest.raises`` without failing alone,
    so that every rank can then assert together."""
    try:
        fn()
    except exception as error:
        return error
    return None


# -- VocabParallelEmbedding ---------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("vocab", vocab_cases())
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_embedding_matches_serial(vocab, tokens, sequence_parallel):
    group = tp_group()
    n, rank, hidden = group.size, group.rank, 5
    ids = token_ids(tokens, vocab)
    grad = numpy.random.default_rng(1).standard_normal(tokens + (hidden,))  # dL/d(full output)

    serial = Embedding(vocab, hidden, dtype=numpy.float64, seed=3)
    expected = serial(ids)
    expected.backward(grad)

    layer = VocabParallelEmbedding(vocab, hidden, group=group, sequence_parallel=sequence_parallel,
                                   dtype=numpy.float64, seed=3)
    block = tokens[0] // n  # this rank's tokens under sequence parallelism
    mine = slice(rank * block, (rank + 1) * block) if sequence_parallel else slice(None)
    with comm.log_collectives() as log:
        y = layer(ids)
    y.backward(grad[mine])  # replicated output: every rank gets the same gradient (Megatron's invariant)

    rows = vocab // n
    parallel_assert(layer.weight.shape == (rows, hidden) and layer.weight.split_axis == 0)
    parallel_assert(max_error(layer.weight.data, serial.weight.data[rank * rows:(rank + 1) * rows]) == 0,
                    "the shard must be the serial table's rows [r V/t, (r+1) V/t)")
    parallel_assert(numpy.array_equal(gather_serial_state(layer, group)["weight"], serial.weight.data),
                    "split_axis=0 lets the generic shard helpers gather the serial table")
    parallel_assert(y.shape == expected.data[mine].shape, f"output {y.shape}")
    error = max_error(y, expected.data[mine])
    parallel_assert(error <= SAME, f"output differs from serial by {error}")
    error = max_error(gathered_rows(layer.weight.grad, group), serial.weight.grad)
    parallel_assert(error <= SAME, f"weight gradient differs from serial by {error}")
    op = "reduce_scatter" if sequence_parallel else "all_reduce"
    parallel_assert([(r.op, r.shape) for r in log] == [(op, tokens + (hidden,))],
                    f"forward moves one s×b×h {op}, never the table:\n{log.table()}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_embedding_gradcheck(sequence_parallel):
    group = tp_group()
    n, vocab, hidden = group.size, 12, 2
    layer = VocabParallelEmbedding(vocab, hidden, group=group, sequence_parallel=sequence_parallel,
                                   dtype=numpy.float64, seed=1)
    ids = token_ids((n, 2), vocab, seed=2)

    # without SP the output is replicated: the same random weights r on every rank, counted once
    result = gradcheck(lambda weight: layer(ids), [layer.weight], comm=group.comm,
                       replicated_output=not sequence_parallel)
    parallel_assert(result.max_error <= GRADCHECK, str(result))
    parallel_assert(result.entries == vocab * hidden, f"every row of the table checked once: {result}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_embedding_float32():
    tp = tp_group()
    n = tp.size
    ids = token_ids((3, 2), 12)
    serial = Embedding(12, 4, seed=5)  # float32
    y = VocabParallelEmbedding(12, 4, seed=5, group=tp)(ids)
    parallel_assert(y.dtype == numpy.float32 and max_error(y, serial(ids)) <= 1e-6, f"{y.dtype} on {n} ranks")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_vocab_not_divisible_raises_on_every_rank():
    group = tp_group()
    vocab = 12 * group.size + 1
    error = raised_on_this_rank(ValueError, lambda: VocabParallelEmbedding(vocab, 4, group=group))
    parallel_assert(error is not None and str(vocab) in str(error), f"expected a ValueError naming V={vocab}: {error}")
    # the ranks are still in step: a collective after the error completes
    parallel_assert(group.comm.allreduce(1) == group.size)


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_sequence_not_divisible_raises_on_every_rank():
    group = tp_group()
    layer = VocabParallelEmbedding(12, 4, group=group, sequence_parallel=True)
    ids = token_ids((group.size + 1, 2), 12)
    error = raised_on_this_rank(ValueError, lambda: layer(ids))
    parallel_assert(error is not None and "sequence" in str(error),
                    f"expected a ValueError about the sequence: {error}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_embedding_id_outside_the_vocabulary_raises_on_every_rank():
    """An id no rank owns would embed as zeros without a word: every rank must refuse it, in step."""
    group = tp_group()
    layer = VocabParallelEmbedding(12, 4, group=group)
    for bad in (-1, 12):
        ids = token_ids((3, 2), 12)
        ids[1, 1] = bad
        error = raised_on_this_rank(ValueError, lambda: layer(ids))
        parallel_assert(error is not None and "vocabulary size 12" in str(error), f"id {bad}: {error}")
    parallel_assert(group.comm.allreduce(1) == group.size)


# -- vocab_parallel_cross_entropy ---------------------------------------------------------------------

def logits_and_targets(tokens, vocab, scale=1.0, seed=0):
    rng = numpy.random.default_rng(seed)
    return scale * rng.standard_normal(tokens + (vocab,)), rng.integers(0, vocab, tokens)


def my_columns(full, group):
    return numpy.ascontiguousarray(comm.split(full, group, axis=-1))


def upstream_grad(reduction, tokens):
    """dL/d(loss): a number other than 1 (so the scaling is tested), one per token for "none"."""
    rng = numpy.random.default_rng(9)
    return rng.standard_normal(tokens) if reduction == "none" else numpy.asarray(0.7)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("vocab", vocab_cases())
@pytest.mark.parametrize("tokens", [(5, 3), (1, 1), ()])  # () : a single token, scalar target
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_serial(vocab, tokens, reduction):
    group = tp_group()
    full, targets = logits_and_targets(tokens, vocab)
    grad = upstream_grad(reduction, tokens)

    logits = Tensor(full.copy(), requires_grad=True)
    expected = F.cross_entropy(logits, targets, reduction=reduction)
    expected.backward(grad)

    shard = Tensor(my_columns(full, group), requires_grad=True)
    loss = vocab_parallel_cross_entropy(shard, targets, group=group, reduction=reduction)
    loss.backward(grad)

    parallel_assert(loss.shape == expected.shape, f"loss shape {loss.shape}, serial {expected.shape}")
    parallel_assert(max_error(loss, expected) <= SAME, f"loss differs by {max_error(loss, expected)}")
    error = max_error(comm.all_gather(shard.grad, group, axis=-1), logits.grad)
    parallel_assert(error <= SAME, f"logits gradient differs from serial by {error}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_gradcheck(reduction):
    group = tp_group()
    tokens = (3, 2)
    full, targets = logits_and_targets(tokens, 12, seed=4)
    shard = Tensor(my_columns(full, group), requires_grad=True)
    # the loss is replicated: the same random weights r on every rank, counted once
    result = gradcheck(lambda z: vocab_parallel_cross_entropy(z, targets, group=group, reduction=reduction),
                       [shard], comm=group.comm, replicated_output=True)
    parallel_assert(result.max_error <= GRADCHECK, str(result))
    parallel_assert(result.entries == full.size, f"every logit checked once: {result}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_cross_entropy_large_logits_stay_finite():
    group = tp_group()
    full, targets = logits_and_targets((4, 3), 12, scale=1e3, seed=5)  # exp(1e3) overflows float64
    logits = Tensor(full.copy(), requires_grad=True)
    expected = F.cross_entropy(logits, targets, reduction="none")
    expected.backward(numpy.ones(targets.shape))
    shard = Tensor(my_columns(full, group), requires_grad=True)
    loss = vocab_parallel_cross_entropy(shard, targets, group=group, reduction="none")
    loss.backward(numpy.ones(targets.shape))
    finite = bool(numpy.isfinite(loss.data).all() and numpy.isfinite(shard.grad).all())
    parallel_assert(finite, f"non-finite loss or gradient with logits of size 1e3: {loss.data}")
    parallel_assert(max_error(loss, expected) <= SAME, f"loss differs by {max_error(loss, expected)}")
    error = max_error(comm.all_gather(shard.grad, group, axis=-1), logits.grad)
    parallel_assert(error <= SAME, f"gradient differs by {error}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_cross_entropy_float32():
    group = tp_group()
    full, targets = logits_and_targets((3, 2), 12, seed=7)
    full = full.astype(numpy.float32)
    logits = Tensor(full.copy(), requires_grad=True)
    expected = F.cross_entropy(logits, targets)
    expected.backward()
    shard = Tensor(my_columns(full, group), requires_grad=True)
    loss = vocab_parallel_cross_entropy(shard, targets, group=group)
    loss.backward()
    parallel_assert(loss.dtype == numpy.float32 and shard.grad.dtype == numpy.float32,
                    f"loss {loss.dtype}, gradient {shard.grad.dtype}")
    error = max(max_error(loss, expected), max_error(comm.all_gather(shard.grad, group, axis=-1), logits.grad))
    parallel_assert(error <= 1e-6, f"float32 loss or gradient differs from serial by {error}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_cross_entropy_moves_three_token_sized_all_reduces_and_nothing_backward():
    group = tp_group()
    tokens, vocab = (6, 4), 12
    full, targets = logits_and_targets(tokens, vocab, seed=6)
    shard = Tensor(my_columns(full, group), requires_grad=True)
    with comm.log_collectives() as forward:
        loss = vocab_parallel_cross_entropy(shard, targets, group=group)
    with comm.log_collectives() as backward:
        loss.backward()

    itemsize = full.itemsize
    gathering_logits = targets.size * vocab * itemsize  # what gathering the logits would move: s×b×V
    message = (f"expected 3 all-reduces of s×b = {targets.size} numbers ({3 * targets.size * itemsize} B in all) "
               f"instead of gathering the s×b×V logits ({gathering_logits} B):\n{forward.table()}")
    parallel_assert([r.op for r in forward] == ["all_reduce"] * 3, message)
    parallel_assert(all(r.shape == targets.shape for r in forward), message)
    parallel_assert(forward.total_payload_bytes() == 3 * targets.size * itemsize, message)
    parallel_assert(len(backward) == 0, f"backward must not communicate:\n{backward.table()}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_cross_entropy_rejects_bad_arguments_on_every_rank():
    group = tp_group()
    full, targets = logits_and_targets((2, 3), 12)
    shard = Tensor(my_columns(full, group))
    cases = {
        "reduction": lambda: vocab_parallel_cross_entropy(shard, targets, group=group, reduction="max"),
        "targets of shape": lambda: vocab_parallel_cross_entropy(shard, targets[:1], group=group),
        "vocabulary size 12": lambda: vocab_parallel_cross_entropy(shard, targets + 12, group=group),
        "[-1,": lambda: vocab_parallel_cross_entropy(shard, targets - 1 - targets.min(), group=group),
    }
    for words, call in cases.items():
        error = raised_on_this_rank(ValueError, call)
        parallel_assert(error is not None and words in str(error), f"expected a ValueError with {words!r}: {error}")
