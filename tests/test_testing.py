"""minitp.testing.directional_gradcheck: right backwards pass, wrong ones fail -- serially and across ranks.

Each wrong backward here is a bug the check exists to catch; each has a right twin that passes with the
same inputs, so a failure is the backward's fault and not the test's.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Function, Tensor, backend, comm
from minitp import functional as F
from minitp.parallel.tensor import mappings
from minitp.testing import directional_gradcheck, gradcheck

WORLD = MPI.COMM_WORLD
TOLERANCE = 1e-6  # float64, eps = 1e-6: the check's own error is about 1e-9
CAUGHT = 1e-3  # a wrong backward's error is of order 1: far above the check's own


def rank_array(rank, shape, seed=0):
    return numpy.random.default_rng(1000 * seed + rank).standard_normal(shape)


def leaf(array):
    return Tensor(backend.xp.asarray(array), requires_grad=True)


def world():
    return comm.Group(WORLD, "world")


class Cube(Function):
    """x³, with d(x³)/dx = 3x² -- or, ``wrong``, 3x: the kind of slip a hand-written backward makes."""

    wrong = False

    def forward(self, x):
        self.save_for_backward(x)
        return x * x * x

    def backward(self, grad):
        (x,) = self.saved
        return grad * 3 * (x if self.wrong else x * x)


class WrongCube(Cube):
    wrong = True


# -- one process ------------------------------------------------------------------------------------

def test_directional_gradcheck_passes_a_composition_of_ops(device):
    x, w, b = leaf(rank_array(0, (3, 4))), leaf(rank_array(0, (4, 5), seed=1)), leaf(rank_array(0, (5,), seed=2))

    def layer(x, w, b):
        return F.gelu(F.layer_norm(x @ w + b, Tensor(backend.xp.ones(5)), Tensor(backend.xp.zeros(5))))

    result = directional_gradcheck(layer, [x, w, b], directions=3)
    assert result.max_error <= TOLERANCE, str(result)
    assert result.entries == x.size + w.size + b.size
    assert gradcheck(layer, [x, w, b]).max_error <= TOLERANCE  # the entrywise check agrees


@pytest.mark.parametrize("op, fails", [(Cube, False), (WrongCube, True)])
def test_directional_gradcheck_catches_a_wrong_backward(op, fails):
    x = leaf(rank_array(0, (4, 3)))
    result = directional_gradcheck(lambda x: op.apply(x) * 2.0, [x])
    assert (result.max_error > CAUGHT) == fails, str(result)


def test_directional_gradcheck_refuses_what_it_cannot_check():
    with pytest.raises(ValueError, match="float64"):
        directional_gradcheck(lambda x: x * x, [Tensor(numpy.ones(3, dtype=numpy.float32), requires_grad=True)])
    with pytest.raises(ValueError, match="replicated_inputs"):
        directional_gradcheck(lambda x: x * x, [leaf(numpy.ones(3))], replicated_inputs=[1])


# -- across ranks: replicated and sharded inputs, through the paper's operators --------------------

def megatron_mlp(x, w1, w2):
    """Megatron's MLP with x² for GeLU: replicated x -> f -> @ W1 (this rank's columns) -> square ->
    @ W2 (this rank's rows) -> f̄ -> replicated y. The entrywise gradcheck cannot take this x: moving one
    rank's copy of it breaks the replication f and f̄ rely on."""
    a = mappings.copy_to_tensor_parallel_region(x, world()) @ w1
    return mappings.reduce_from_tensor_parallel_region((a * a) @ w2, world())


def mlp_inputs():
    rank = WORLD.rank
    seq, batch, hidden, ffn = 2, 1, 3, 2  # ffn per rank
    x = leaf(rank_array(0, (seq, batch, hidden)))  # replicated: the same on every rank
    w1 = leaf(rank_array(rank, (hidden, ffn), seed=1))  # columns r of A
    w2 = leaf(rank_array(rank, (ffn, hidden), seed=2))  # rows r of B
    return [x, w1, w2]


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_directional_gradcheck_of_the_tensor_parallel_mlp_with_a_replicated_input():
    inputs = mlp_inputs()
    result = directional_gradcheck(megatron_mlp, inputs, comm=WORLD, replicated_inputs=[0], replicated_output=True,
                                   directions=3)
    parallel_assert(result.max_error <= TOLERANCE, str(result))
    x, w1, w2 = inputs
    parallel_assert(result.entries == x.size + WORLD.size * (w1.size + w2.size), str(result))  # x counted once


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_directional_gradcheck_catches_an_f_without_its_all_reduce(monkeypatch):
    """f's backward left as the identity: each rank's dL/dx is only its own shard's part of the sum."""
    monkeypatch.setattr(mappings.CopyToTensorParallelRegion, "backward", lambda self, grad: grad)
    result = directional_gradcheck(megatron_mlp, mlp_inputs(), comm=WORLD, replicated_inputs=[0],
                                   replicated_output=True)
    parallel_assert(result.max_error > CAUGHT, f"a missing all-reduce went unnoticed: {result}")


class GatherGivingBackTheNextRanksBlock(mappings.GatherFromSequenceParallelRegion):
    """g's forward (all-gather the sequence); backward hands rank r the gradient of rank r+1's tokens."""

    def backward(self, grad):
        blocks = numpy.split(grad, self.group.size, axis=0)
        return blocks[(self.group.rank + 1) % self.group.size]


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("gather, fails", [(mappings.GatherFromSequenceParallelRegion, False),
                                           (GatherGivingBackTheNextRanksBlock, True)])
def test_directional_gradcheck_catches_a_gradient_sent_to_the_wrong_rank(gather, fails):
    """Sharded tokens -> all-gather -> @ M -> square: a replicated output. The wrong backward gives each
    rank another rank's gradient; summed over the ranks those are the same numbers, so only directions
    that differ from rank to rank (as the check draws them for sharded inputs) can tell."""
    x = leaf(rank_array(WORLD.rank, (2, 1, 3)))  # this rank's 2 tokens
    mixing = Tensor(rank_array(0, (3, 3), seed=1))  # replicated constant

    def layer(x):
        full = gather.apply(x, group=world(), tensor_parallel_output_grad=False) @ mixing
        return full * full

    result = directional_gradcheck(layer, [x], comm=WORLD, replicated_output=True)
    parallel_assert((result.max_error > CAUGHT) == (fails and WORLD.size > 1), str(result))
