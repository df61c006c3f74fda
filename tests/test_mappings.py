"""minitp.parallel.tensor.mappings: each operator's forward and backward against numpy, the collectives each one
logs, and finite-difference gradchecks of small sharded compositions.

Rank r's data is ``rank_array(r, ...)``, which every rank can rebuild, so each rank computes the expected
values with numpy from all the ranks' data. Shapes are (s, b, h): sequence first.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.autograd import Tensor
from minitp.parallel.tensor import mappings
from minitp.testing import gradcheck, max_error

WORLD = MPI.COMM_WORLD
EXACT = 1e-15  # sums of a few float64 numbers in another order: rounding only

# per-rank block shapes (seq block, batch, hidden block): odd sizes, and batch 1 with one token per rank
BLOCKS = [(2, 3, 5), (1, 1, 1)]


def rank_array(rank, shape, seed=0):
    return numpy.random.default_rng(1000 * seed + rank).standard_normal(shape)


def all_ranks(shape, seed=0):
    return [rank_array(r, shape, seed) for r in range(WORLD.size)]


def world():
    return comm.Group(WORLD, "world")


def run(operator, x, grad, **options):
    """y = operator(x); y.backward(grad). Returns y, dL/dx and the (op, tag) pairs logged in each pass."""
    x = Tensor(x, requires_grad=True)
    with comm.log_collectives() as forward_log:
        y = operator(x, world(), **options)
    with comm.log_collectives() as backward_log:
        y.backward(grad)
    return y.data, x.grad, [(r.op, r.tag) for r in forward_log], [(r.op, r.tag) for r in backward_log]


# -- each operator: forward, backward, and what it logs ---------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_f_is_identity_forward_and_all_reduce_backward(block):
    x = rank_array(0, block)  # replicated: the same input on every rank
    grads = all_ranks(block, seed=1)  # each rank's own contribution to dL/dx
    y, dx, forward, backward = run(mappings.copy_to_tensor_parallel_region, x, grads[WORLD.rank])
    parallel_assert(numpy.array_equal(y, x))
    parallel_assert(max_error(dx, sum(grads)) <= EXACT, "f backward must sum the ranks' gradients")
    parallel_assert(forward == [] and backward == [("all_reduce", "f backward")], f"{forward} {backward}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_f_bar_is_all_reduce_forward_and_identity_backward(block):
    partials = all_ranks(block)
    grad = rank_array(WORLD.rank, block, seed=1)
    y, dx, forward, backward = run(mappings.reduce_from_tensor_parallel_region, partials[WORLD.rank], grad)
    parallel_assert(max_error(y, sum(partials)) <= EXACT)
    parallel_assert(numpy.array_equal(dx, grad))
    parallel_assert(forward == [("all_reduce", "f-bar forward")] and backward == [], f"{forward} {backward}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_scatter_to_tensor_parallel_region_splits_the_last_axis(block):
    n, rank = WORLD.size, WORLD.rank
    s, b, k = block
    x = rank_array(0, (s, b, k * n))  # replicated
    grads = all_ranks((s, b, k), seed=1)
    y, dx, forward, backward = run(mappings.scatter_to_tensor_parallel_region, x, grads[rank])
    parallel_assert(numpy.array_equal(y, x[..., rank * k:(rank + 1) * k]))
    parallel_assert(numpy.array_equal(dx, numpy.concatenate(grads, axis=-1)))
    parallel_assert(forward == [] and backward == [("all_gather", "scatter(last) backward")])


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_gather_from_tensor_parallel_region_gathers_the_last_axis(block):
    n, rank = WORLD.size, WORLD.rank
    s, b, k = block
    shards = all_ranks(block)
    grad = rank_array(0, (s, b, k * n), seed=1)  # the gradient of a replicated output is replicated
    y, dx, forward, backward = run(mappings.gather_from_tensor_parallel_region, shards[rank], grad)
    parallel_assert(numpy.array_equal(y, numpy.concatenate(shards, axis=-1)))
    parallel_assert(numpy.array_equal(dx, grad[..., rank * k:(rank + 1) * k]))
    parallel_assert(forward == [("all_gather", "gather(last) forward")] and backward == [])


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_scatter_to_sequence_parallel_region_splits_the_sequence(block):
    n, rank = WORLD.size, WORLD.rank
    s, b, h = block
    x = rank_array(0, (s * n, b, h))  # replicated
    grads = all_ranks(block, seed=1)
    y, dx, forward, backward = run(mappings.scatter_to_sequence_parallel_region, x, grads[rank])
    parallel_assert(numpy.array_equal(y, x[rank * s:(rank + 1) * s]))
    parallel_assert(numpy.array_equal(dx, numpy.concatenate(grads, axis=0)))
    parallel_assert(forward == [] and backward == [("all_gather", "scatter(seq) backward")])


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_g_is_all_gather_forward_and_reduce_scatter_backward(block):
    n, rank = WORLD.size, WORLD.rank
    s, b, h = block
    shards = all_ranks(block)
    grads = all_ranks((s * n, b, h), seed=1)  # each rank's partial dL/dx of the whole sequence
    y, dx, forward, backward = run(mappings.gather_from_sequence_parallel_region, shards[rank], grads[rank])
    parallel_assert(numpy.array_equal(y, numpy.concatenate(shards, axis=0)))
    parallel_assert(max_error(dx, sum(grads)[rank * s:(rank + 1) * s]) <= EXACT)
    parallel_assert(forward == [("all_gather", "g forward")] and backward == [("reduce_scatter", "g backward")])


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_g_into_a_replicated_region_splits_backward(block):
    n, rank = WORLD.size, WORLD.rank
    s, b, h = block
    shards = all_ranks(block)
    grad = rank_array(0, (s * n, b, h), seed=1)  # replicated
    y, dx, forward, backward = run(mappings.gather_from_sequence_parallel_region, shards[rank], grad,
                                   tensor_parallel_output_grad=False)
    parallel_assert(numpy.array_equal(y, numpy.concatenate(shards, axis=0)))
    parallel_assert(numpy.array_equal(dx, grad[rank * s:(rank + 1) * s]))
    parallel_assert(forward == [("all_gather", "g forward")] and backward == [])


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("block", BLOCKS)
def test_g_bar_is_reduce_scatter_forward_and_all_gather_backward(block):
    n, rank = WORLD.size, WORLD.rank
    s, b, h = block
    partials = all_ranks((s * n, b, h))
    grads = all_ranks(block, seed=1)
    y, dx, forward, backward = run(mappings.reduce_scatter_to_sequence_parallel_region, partials[rank], grads[rank])
    parallel_assert(max_error(y, sum(partials)[rank * s:(rank + 1) * s]) <= EXACT)
    parallel_assert(numpy.array_equal(dx, numpy.concatenate(grads, axis=0)))
    parallel_assert(forward == [("reduce_scatter", "g-bar forward")] and backward == [("all_gather", "g-bar backward")])


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_float32_stays_float32_through_every_operator():
    n = WORLD.size
    x = Tensor(rank_array(0, (2 * n, 1, 3 * n)).astype(numpy.float32), requires_grad=True)
    y = mappings.copy_to_tensor_parallel_region(x, world())
    y = mappings.reduce_from_tensor_parallel_region(y, world())
    y = mappings.scatter_to_tensor_parallel_region(y, world())
    y = mappings.gather_from_tensor_parallel_region(y, world())
    y = mappings.reduce_scatter_to_sequence_parallel_region(y, world())
    y = mappings.gather_from_sequence_parallel_region(y, world())
    y = mappings.scatter_to_sequence_parallel_region(y, world())
    y.backward(numpy.ones(y.shape, dtype=numpy.float32))
    parallel_assert(y.dtype == numpy.float32 and x.grad.dtype == numpy.float32, f"{y.dtype} {x.grad.dtype}")
    parallel_assert(y.shape == (2, 1, 3 * n) and x.grad.shape == x.shape)


# -- groups, tags, errors ---------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[4])
def test_operators_communicate_within_their_tensor_parallel_group_only():
    mesh = comm.Mesh(tp_size=2)  # tp groups {0, 1} and {2, 3}
    x = Tensor(numpy.full((2, 1, 3), float(WORLD.rank)))
    total = mappings.reduce_from_tensor_parallel_region(x, mesh.tp).data
    parallel_assert(numpy.all(total == sum(mesh.tp.ranks)), f"{total.ravel()} for tp group {mesh.tp.ranks}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_operators_need_their_group_and_prefix_tags():
    """No global mesh to fall back on: a call without its group is refused on every rank, before any
    communication; with it, the tag prefixes the log's names."""
    mesh = comm.init(tp=WORLD.size)
    with comm.log_collectives() as log:
        try:
            mappings.f_bar(Tensor(numpy.ones((1, 1, 2))), None)
            refused = False
        except TypeError as error:
            refused = "group" in str(error)
    parallel_assert(refused and len(log) == 0, "f-bar without a group was not refused before communicating")
    with comm.log_collectives() as log:
        y = mappings.f_bar(Tensor(numpy.ones((1, 1, 2))), mesh.tp, tag="mlp")
    parallel_assert(numpy.all(y.data == WORLD.size))
    parallel_assert([(r.group, r.tag) for r in log] == [("tp", "mlp: f-bar forward")], log.table())


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_lengths_that_do_not_divide_raise_on_every_rank_before_communicating():
    n = WORLD.size
    cases = {
        "scatter(seq)": (mappings.scatter_to_sequence_parallel_region, (n + 1, 1, 2)),
        "g-bar": (mappings.reduce_scatter_to_sequence_parallel_region, (n + 1, 1, 2)),
        "scatter(last)": (mappings.scatter_to_tensor_parallel_region, (2, 1, n + 1)),
    }
    for name, (operator, shape) in cases.items():
        with comm.log_collectives() as log:
            try:
                operator(Tensor(numpy.ones(shape)), world())
                raised = False
            except ValueError:
                raised = True
        parallel_assert(raised and len(log) == 0, f"{name} of shape {shape} on {n} ranks")


# -- finite differences through sharded compositions ------------------------------------------------
#
# gradcheck perturbs each rank's inputs in turn, so every input must be a shard (one value per global
# entry): a replicated leaf has n copies, and the gradient of "all copies moving together" that f
# computes is not the derivative with respect to one copy. So each composition starts from shards,
# passes through a replicated region, and ends in shards -- as a sequence-parallel model does.


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_gradcheck_tensor_parallel_mlp_f_and_f_bar():
    """Megatron's MLP with x² for GeLU: x (s/n tokens) -> replicated -> f -> X W1_r -> square -> W2_r ->
    f̄ -> this rank's s/n tokens. Checks f, f̄, and entering and leaving a sequence-parallel region."""
    n, rank = WORLD.size, WORLD.rank
    seq, batch, hidden, ffn = 1, 2, 3, 2  # per rank
    tokens = Tensor(rank_array(rank, (seq, batch, hidden)), requires_grad=True)
    w1 = Tensor(rank_array(rank, (hidden, ffn), seed=1), requires_grad=True)  # columns r of A
    w2 = Tensor(rank_array(rank, (ffn, hidden), seed=2), requires_grad=True)  # rows r of B

    def mlp(tokens, w1, w2):
        x = mappings.gather_from_sequence_parallel_region(tokens, world(), tensor_parallel_output_grad=False)
        a = mappings.copy_to_tensor_parallel_region(x, world()) @ w1
        y = mappings.reduce_from_tensor_parallel_region((a * a) @ w2, world())
        return mappings.scatter_to_sequence_parallel_region(y, world())

    result = gradcheck(mlp, [tokens, w1, w2], comm=WORLD)
    parallel_assert(result.max_error <= 1e-6, str(result))
    parallel_assert(result.entries == n * (tokens.size + w1.size + w2.size), str(result))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_gradcheck_sequence_parallel_mlp_g_and_g_bar():
    """The same MLP with sequence parallelism: x (s/n tokens) -> g -> X W1_r -> square -> W2_r -> ḡ."""
    rank = WORLD.rank
    seq, batch, hidden, ffn = 2, 1, 3, 2  # per rank
    tokens = Tensor(rank_array(rank, (seq, batch, hidden)), requires_grad=True)
    w1 = Tensor(rank_array(rank, (hidden, ffn), seed=1), requires_grad=True)
    w2 = Tensor(rank_array(rank, (ffn, hidden), seed=2), requires_grad=True)

    def mlp(tokens, w1, w2):
        a = mappings.gather_from_sequence_parallel_region(tokens, world()) @ w1
        return mappings.reduce_scatter_to_sequence_parallel_region((a * a) @ w2, world())

    result = gradcheck(mlp, [tokens, w1, w2], comm=WORLD)
    parallel_assert(result.max_error <= 1e-6, str(result))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_gradcheck_gather_and_scatter_of_the_last_axis():
    """x (h/n columns) -> all-gather -> @ M (mixes every column) -> square -> split -> * w (h/n columns)."""
    n, rank = WORLD.size, WORLD.rank
    seq, batch, columns = 2, 1, 2  # per rank
    hidden = columns * n
    x = Tensor(rank_array(rank, (seq, batch, columns)), requires_grad=True)
    w = Tensor(rank_array(rank, (columns,), seed=1), requires_grad=True)
    mixing = Tensor(rank_array(0, (hidden, hidden), seed=2))  # replicated constant

    def layer(x, w):
        full = mappings.gather_from_tensor_parallel_region(x, world()) @ mixing
        return mappings.scatter_to_tensor_parallel_region(full * full, world()) * w

    result = gradcheck(layer, [x, w], comm=WORLD)
    parallel_assert(result.max_error <= 1e-6, str(result))
