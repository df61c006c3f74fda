"""Activation recomputation (Korthikanti et al. 2022, section 5) changes memory, never the numbers.

- ``recompute="selective"`` (the attention core re-run in backward) and ``"full"`` (the whole layer)
  give the same output and gradients as the plain block, float64, dropout on: serially, and on 1, 2
  and 4 ranks with tensor parallelism and with sequence parallelism, against the serial plain block
  to 1e-12;
- the dropout masks are the same in the re-run: two forwards before two backwards (two micro-batches)
  still give the plain block's gradients, and the counters end where the plain block's do;
- the bytes kept for backward, exactly: selective drops the attention core's softmax, dropout mask and
  dropped probabilities (and the 1/sqrt(d) scale constant) and keeps q, k, v; full keeps the block's
  input alone -- the paper's 2sbh at 2-byte activations;
- a finite-difference gradcheck through a checkpointed region; parameters get gradients even when the
  input needs none; backward works inside ``no_grad``; a bad ``recompute`` raises.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import backend, comm, track_saved
from minitp.autograd import Tensor, no_grad
from minitp.nn import Dropout, MultiHeadAttention, TransformerBlock
from minitp.nn.recompute import recompute
from minitp.parallel import ParallelAttention, ParallelTransformerBlock
from minitp.parallel.tensor.shard import gather_serial_grads, load_serial_state
from minitp.testing import gradcheck, max_error

TIGHT = 1e-12
GRADCHECK = 1e-6
F64 = numpy.float64
# (seq, batch, hidden, heads): odd sizes, batch 1, a single token, a single head
SHAPES = [(5, 2, 12, 3), (1, 1, 4, 1), (3, 1, 6, 2)]


def random(shape, seed, dtype=F64):
    return backend.from_host(numpy.random.default_rng(seed).standard_normal(shape).astype(dtype))


def randomize(module, seed=0):
    """Random weights: LayerNorm's ones and zeros would hide a forward that skipped them."""
    generator = numpy.random.default_rng(seed)
    for parameter in module.parameters():
        parameter.data[...] = backend.from_host(0.5 * generator.standard_normal(parameter.shape))
    return module


def block(recompute, hidden, heads, dtype=F64, seed=3):
    # dropout high enough that every mask drops something at these sizes
    return randomize(TransformerBlock(hidden, heads, dropout=0.3, attention_dropout=0.4, seed=seed, dtype=dtype,
                                      recompute=recompute))


def run(module, x, upstream, requires_grad=True):
    """Output, input gradient and {name: parameter gradient} after one forward and backward."""
    x = Tensor(x.copy(), requires_grad=requires_grad)
    y = module(x)
    y.backward(upstream)
    return y.data, x.grad, {name: p.grad for name, p in module.named_parameters()}


def errors_between(a, b):
    """{what: max error} between two ``run`` results."""
    errors = {"output": max_error(a[0], b[0])}
    if b[1] is not None:
        errors["input grad"] = max_error(a[1], b[1])
    errors.update({f"{name} grad": max_error(a[2][name], b[2][name]) for name in b[2]})
    return errors


def counters(module):
    return [sub.counter for sub in module.modules() if isinstance(sub, Dropout)]


# -- serial: the same numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("seq, batch, hidden, heads", SHAPES)
def test_recomputed_block_equals_plain_block(device, recompute, seq, batch, hidden, heads):
    x, upstream = random((seq, batch, hidden), 1), random((seq, batch, hidden), 2)
    plain, recomputed = block(None, hidden, heads), block(recompute, hidden, heads)
    errors = errors_between(run(recomputed, x, upstream), run(plain, x, upstream))
    assert max(errors.values()) <= TIGHT, errors
    assert counters(recomputed) == counters(plain)  # the re-run put the counters back


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_two_forwards_then_two_backwards_use_each_forwards_masks(recompute):
    """Two micro-batches, the second walked back first: when each backward runs, the dropouts have
    advanced past both forwards. Each re-run must rewind to its own forward's counters (not use the
    current ones), and must leave the counters where it found them (not where its forward left them:
    the first micro-batch's re-run runs last and would leave them at 1)."""
    seq, batch, hidden, heads = 4, 2, 8, 2
    results = {}
    for mode in (None, recompute):
        module = block(mode, hidden, heads)
        first, second = Tensor(random((seq, batch, hidden), 1), requires_grad=True), \
            Tensor(random((seq, batch, hidden), 2), requires_grad=True)
        y1, y2 = module(first), module(second)
        y2.backward(random((seq, batch, hidden), 4))
        y1.backward(random((seq, batch, hidden), 3))
        results[mode] = (first.grad, second.grad, {n: p.grad for n, p in module.named_parameters()},
                         counters(module))
    plain, recomputed = results[None], results[recompute]
    errors = {"first input grad": max_error(recomputed[0], plain[0]),
              "second input grad": max_error(recomputed[1], plain[1])}
    errors.update({f"{n} grad": max_error(recomputed[2][n], plain[2][n]) for n in plain[2]})
    assert max(errors.values()) <= TIGHT, errors
    assert recomputed[3] == plain[3] == [2, 2, 2]  # three dropouts, two calls each


def test_parameters_get_gradients_when_the_input_needs_none():
    """A region whose input needs no gradient (a first layer fed raw data) must still be recorded, so
    that its weights learn."""
    x, upstream = random((3, 2, 8), 1), random((3, 2, 8), 2)
    plain = run(block(None, 8, 2), x, upstream, requires_grad=False)
    full = run(block("full", 8, 2), x, upstream, requires_grad=False)
    errors = errors_between(full, plain)
    assert full[1] is None and max(errors.values()) <= TIGHT, errors


def test_backward_inside_no_grad_still_recomputes():
    x, upstream = random((3, 2, 8), 1), random((3, 2, 8), 2)
    plain = run(block(None, 8, 2), x, upstream)
    module = block("full", 8, 2)
    tensor = Tensor(x.copy(), requires_grad=True)
    y = module(tensor)
    with no_grad():
        y.backward(upstream)
    errors = errors_between((y.data, tensor.grad, {n: p.grad for n, p in module.named_parameters()}), plain)
    assert max(errors.values()) <= TIGHT, errors


def test_gradcheck_through_a_checkpointed_attention():
    """Finite differences through the re-run region: its backward is the derivative of its forward,
    with the dropout masks held fixed (each forward rewinds the counter, as the re-run does)."""
    attention = randomize(MultiHeadAttention(4, 2, attention_dropout=0.3, dropout=0.2, seed=1, dtype=F64,
                                             recompute="selective"))
    x = Tensor(random((3, 1, 4), 1), requires_grad=True)

    def forward(x, *parameters):
        for sub in attention.modules():
            if isinstance(sub, Dropout):
                sub.counter = 0
        return attention(x)

    result = gradcheck(forward, [x, *attention.parameters()])
    assert result.max_error <= GRADCHECK, result


def test_checkpoint_of_a_plain_function_keeps_its_inputs_only():
    a, b = Tensor(random((4, 3), 1), requires_grad=True), Tensor(random((3, 5), 2), requires_grad=True)
    with track_saved() as saved:
        y = recompute(lambda a, b: (a @ b).tanh().sum(), a, b)
    assert saved.by_op == {"RecomputeFunction": a.data.nbytes + b.data.nbytes}
    y.backward()
    expected_a = (1 - numpy.tanh(a.data @ b.data) ** 2) @ b.data.T
    assert max_error(a.grad, expected_a) <= TIGHT


def test_bad_recompute_raises():
    with pytest.raises(ValueError, match="recompute"):
        TransformerBlock(8, 2, recompute="everything")
    with pytest.raises(ValueError, match="recompute"):
        MultiHeadAttention(8, 2, recompute="full")  # "full" is a block's choice: it wraps the whole layer


# -- serial: the bytes kept for backward ---------------------------------------------------------------

def saved_bytes(module, x):
    with track_saved() as saved:
        module(Tensor(x, requires_grad=True))
    return saved


@pytest.mark.parametrize("dtype", [numpy.float32, F64])
@pytest.mark.parametrize("seq, batch, hidden, heads", SHAPES)
def test_selective_recompute_drops_exactly_the_attention_core(seq, batch, hidden, heads, dtype):
    x = random((seq, batch, hidden), 1, dtype)
    e = numpy.dtype(dtype).itemsize
    plain = saved_bytes(block(None, hidden, heads, dtype), x)
    selective = saved_bytes(block("selective", hidden, heads, dtype), x)
    scores = heads * seq * seq * batch  # the paper's as^2b
    # gone: the softmax output (e per score), the attention dropout's mask (1 byte) and the dropped
    # probabilities (e), and the 0-d constant 1/sqrt(d) that scales q (e bytes, kept by its Mul)
    assert plain.total - selective.total == scores * (2 * e + 1) + e
    assert "Softmax" not in selective.by_op and "Mul" not in selective.by_op
    # kept in their place: q, k and v, each (b, a, s, d) = sbh entries -- which the plain block keeps
    # too (the scaled q and k for QK^T, v for the product with V): the paper's 4sbh + 2sbh
    assert selective.by_op["RecomputeFunction"] == 3 * seq * batch * hidden * e


@pytest.mark.parametrize("seq, batch, hidden, heads", SHAPES)
def test_full_recompute_keeps_only_the_block_input(seq, batch, hidden, heads):
    x = random((seq, batch, hidden), 1, numpy.float32)
    assert saved_bytes(block("full", hidden, heads, numpy.float32), x).by_op == {"RecomputeFunction": x.nbytes}


# -- parallel: the same numbers as the serial plain block, and the bytes per rank ----------------------

def sequence_rows(array, group):
    """Rank r's block of the sequence (axis 0)."""
    return numpy.ascontiguousarray(comm.split(array, group, 0))


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_parallel_recomputed_block_equals_serial_plain_block(recompute, sequence_parallel):
    world = MPI.COMM_WORLD
    tp = comm.init(tp=world.size).tp
    t = tp.size
    seq, batch, hidden, heads = 2 * t, 2, 8, 4  # heads and ffn (4h) divide by 1, 2 and 4
    x, upstream = random((seq, batch, hidden), 1), random((seq, batch, hidden), 2)
    serial = block(None, hidden, heads)
    expected = run(serial, x, upstream)

    cut = (lambda a: sequence_rows(a, tp)) if sequence_parallel else (lambda a: a)
    sharded = ParallelTransformerBlock(hidden, heads, dropout=0.3, attention_dropout=0.4, seed=3, dtype=F64,
                                       sequence_parallel=sequence_parallel, group=tp, recompute=recompute)
    load_serial_state(sharded, serial.state_dict(), tp)
    sharded_x = Tensor(cut(x), requires_grad=True)
    with track_saved() as saved:
        sharded_y = sharded(sharded_x)
    sharded_y.backward(cut(upstream))
    grads = gather_serial_grads(sharded, tp)

    errors = {"output": max_error(sharded_y, cut(expected[0])),
              "input grad": max_error(sharded_x.grad, cut(expected[1]))}
    errors.update({f"{name} grad": max_error(grads[name], grad) for name, grad in expected[2].items()})
    name = max(errors, key=errors.get)
    parallel_assert(errors[name] <= TIGHT, f"t={t}: largest error {errors[name]:.2e} in {name}")
    parallel_assert(counters(sharded) == counters(serial), "the re-run left the dropout counters moved")

    e, local_heads = 8, heads // t
    if recompute == "full":  # the rank's input alone: (s, b, h), or its s/t tokens under sequence parallelism
        parallel_assert(saved.by_op == {"RecomputeFunction": sharded_x.data.nbytes}, f"full keeps {saved.by_op}")
    else:  # q, k, v of the rank's heads, and no (b, a/t, s, s) score-sized array anywhere
        parallel_assert(saved.by_op.get("RecomputeFunction") == 3 * seq * batch * (hidden // t) * e
                        and "Softmax" not in saved.by_op, f"selective keeps {saved.by_op}")
        plain = ParallelTransformerBlock(hidden, heads, dropout=0.3, attention_dropout=0.4, seed=3, dtype=F64,
                                         sequence_parallel=sequence_parallel, group=tp)
        with track_saved() as plain_saved:
            plain(Tensor(cut(x), requires_grad=True))
        dropped = local_heads * seq * seq * batch * (2 * e + 1) + e
        parallel_assert(plain_saved.total - saved.total == dropped,
                        f"selective saves {plain_saved.total - saved.total} bytes, expected {dropped}")


@pytest.mark.parallel(nprocs=[2])
def test_parallel_attention_rejects_full():
    tp = comm.init(tp=MPI.COMM_WORLD.size).tp
    try:
        ParallelAttention(8, 2, group=tp, recompute="full")
        raised = False
    except ValueError:
        raised = True
    parallel_assert(raised, "ParallelAttention accepted recompute='full'")
