"""Ulysses attention against the serial causal attention core, in float64 (output and every gradient
within 1e-12, with attention dropout, on 1, 2 and 4 ranks); a gradcheck through both all-to-alls; its
bytes equal 4(cp-1)/cp·(s/cp)·b·h·e each way; heads cp does not divide are refused before communicating.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Tensor, comm, nn
from minitp.parallel.context.ulysses import ulysses_attention
from minitp.testing import gradcheck, max_error

WORLD = MPI.COMM_WORLD
SAME, GRADCHECK = 1e-12, 1e-6
B, A, S, D = 2, 4, 8, 3  # 4 heads and 8 tokens split over cp = 1, 2, 4


def cp_group():
    return comm.init(cp=WORLD.size).cp


def qkv(seed=0, shape=(B, A, S, D)):
    rng = numpy.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(3)]


def block(array, group):
    """This rank's contiguous block of the sequence (axis 2)."""
    return numpy.ascontiguousarray(numpy.split(array, group.size, axis=2)[group.rank])


def head_dropout(p, group):
    """The attention dropout of a Ulysses rank: its a/cp heads of the serial mask."""
    return nn.Dropout(p, seed=3, splits=((1, group.rank, group.size),)) if p else None


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_ulysses_equals_serial_attention(p):
    group = cp_group()
    q, k, v = qkv()
    upstream = numpy.random.default_rng(1).standard_normal(q.shape)
    serial = [Tensor(x.copy(), requires_grad=True) for x in (q, k, v)]
    expected = nn.attention_core(*serial, causal=True, dropout=nn.Dropout(p, seed=3) if p else None)
    expected.backward(upstream)

    leaves = [Tensor(block(x, group), requires_grad=True) for x in (q, k, v)]
    out = ulysses_attention(*leaves, group=group, dropout=head_dropout(p, group))
    out.backward(block(upstream, group))
    errors = {"output": max_error(out, block(expected.data, group))}
    errors.update({f"d{name}": max_error(leaf.grad, block(reference.grad, group))
                   for name, leaf, reference in zip("qkv", leaves, serial)})
    parallel_assert(max(errors.values()) <= SAME, f"p={p}: {errors}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_gradcheck_through_the_all_to_alls():
    group = cp_group()
    inputs = [Tensor(block(x, group), requires_grad=True) for x in qkv(2, (1, 2, 4, 2))]
    dropout = head_dropout(0.3, group)

    def attend(q, k, v):
        dropout.counter = 0
        return ulysses_attention(q, k, v, group=group, dropout=dropout)

    result = gradcheck(attend, inputs, comm=group.comm)
    parallel_assert(result.max_error <= GRADCHECK, str(result))


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_ulysses_bytes_equal_the_formula():
    """Two all-to-alls each way, of 3 and 1 (s/cp)·b·h-sized blocks: 4(cp-1)/cp·(s/cp)·b·h·e per rank."""
    group = cp_group()
    cp, tokens = group.size, S // group.size
    leaves = [Tensor(block(x, group), requires_grad=True) for x in qkv()]
    with comm.log_collectives() as forward:
        out = ulysses_attention(*leaves, group=group)
    with comm.log_collectives() as backward:
        out.backward(numpy.ones(out.shape))
    formula = 4 * (cp - 1) / cp * tokens * B * A * D * 8
    for log in (forward, backward):
        parallel_assert([r.op for r in log] == ["all_to_all"] * 2 and all(r.group == "cp" for r in log), log.table())
        parallel_assert(log.total_ring_bytes() == formula, f"{log.total_ring_bytes()} vs {formula}:\n{log.table()}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_heads_cp_does_not_divide_are_refused_before_communicating():
    group = cp_group()
    leaves = [Tensor(x) for x in qkv(shape=(1, group.size + 1, 2, 2))]
    with comm.log_collectives() as log:
        try:
            ulysses_attention(*leaves, group=group)
            error = None
        except ValueError as raised:
            error = str(raised)
    parallel_assert(error is not None and "heads" in error and "Ulysses" in error and len(log) == 0, f"{error}")
