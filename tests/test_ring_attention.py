"""Ring attention against the serial causal attention core, in float64: each rank's output rows and the
gradients of its q, k and v rows equal serial's within 1e-12 (contiguous and zigzag placement, with and
without attention dropout, on 1, 2 and 4 ranks); a finite-difference gradcheck of the ring operator,
communication included; the bytes in the collective log equal 2(cp-1)·(s/cp)·b·h·e forward and twice
that backward; and the work per rank (attended (query, key) pairs) is balanced by zigzag.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Tensor, comm, nn
from minitp.nn import placement
from minitp.parallel.context.ring import attended_pairs, ring_attention, ring_schedule
from minitp.testing import gradcheck, max_error

WORLD = MPI.COMM_WORLD
SAME, GRADCHECK = 1e-12, 1e-6
B, A, S, D = 2, 3, 16, 4  # s = 16 splits into 2·cp chunks for cp = 1, 2, 4, 8


def cp_group():
    return comm.init(cp=WORLD.size).cp


def qkv(seed=0, shape=(B, A, S, D)):
    rng = numpy.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(3)]


def serial_attention(q, k, v, upstream, p):
    """Output and (dq, dk, dv) of the serial causal attention core."""
    leaves = [Tensor(x.copy(), requires_grad=True) for x in (q, k, v)]
    out = nn.attention_core(*leaves, causal=True, dropout=nn.Dropout(p, seed=3) if p else None)
    out.backward(upstream)
    return out.data, [leaf.grad for leaf in leaves]


def mine(array, group, layout, axis=2):
    """This rank's tokens of a serial (b, a, s, d) array, in its placement's order."""
    _, where = placement.positions([(group.rank, group.size, layout)], array.shape[axis] // group.size)
    return numpy.ascontiguousarray(numpy.take(array, where, axis=axis))


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("layout", placement.LAYOUTS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_ring_attention_equals_serial_attention(layout, p):
    group = cp_group()
    q, k, v = qkv()
    upstream = numpy.random.default_rng(1).standard_normal(q.shape)
    expected, expected_grads = serial_attention(q, k, v, upstream, p)

    leaves = [Tensor(mine(x, group, layout), requires_grad=True) for x in (q, k, v)]
    out = ring_attention(*leaves, group=group, layout=layout, dropout=nn.Dropout(p, seed=3) if p else None)
    out.backward(mine(upstream, group, layout))
    errors = {"output": max_error(out, mine(expected, group, layout))}
    errors.update({f"d{name}": max_error(leaf.grad, mine(grad, group, layout))
                   for name, leaf, grad in zip("qkv", leaves, expected_grads)})
    parallel_assert(max(errors.values()) <= SAME, f"{layout}, p={p}: {errors}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("layout", placement.LAYOUTS)
@pytest.mark.parametrize("offset", [1e3, -1e3])
def test_ring_attention_equals_serial_attention_with_scores_beyond_exps_range(layout, offset):
    """Scores of about ±1000: e^1000 overflows float64 (its largest is ~e^709.8) and e^-1000 underflows
    to 0. The softmax is unchanged by a constant added to a row, so serial attention (which subtracts
    the row's max) is as exact as ever; so must the ring's merge of its blocks' log-sum-exps be, which it
    is only with the larger lse subtracted before exponentiating -- without it the merge is exact for
    ordinary scores and inf/NaN here (as cross-entropy's large-logit test pins its own log-sum-exp).
    Every key's last coordinate is 1 and every query's offset·√d, so each score is offset plus an
    ordinary one: rows far outside exp's range, with softmaxes that are not one-hot."""
    group = cp_group()
    q, k, v = qkv(3)
    q[..., -1], k[..., -1] = offset * D ** 0.5, 1.0
    upstream = numpy.random.default_rng(4).standard_normal(q.shape)
    expected, expected_grads = serial_attention(q, k, v, upstream, 0.0)
    leaves = [Tensor(mine(x, group, layout), requires_grad=True) for x in (q, k, v)]
    out = ring_attention(*leaves, group=group, layout=layout)
    out.backward(mine(upstream, group, layout))
    errors = {"output": max_error(out, mine(expected, group, layout))}
    errors.update({f"d{name}": max_error(leaf.grad, mine(grad, group, layout))  # relative: dk's last column ~1e3
                   for name, leaf, grad in zip("qkv", leaves, expected_grads)})
    finite = all(numpy.isfinite(x).all() for x in [out.data] + [leaf.grad for leaf in leaves])
    # 1e-11, not 1e-12: a score of ~1000 carries ~1000·eps of rounding, which exp turns into relative
    # error of the probabilities (measured ~1e-13); a merge without its max gives inf or NaN
    parallel_assert(finite and max(errors.values()) <= 1e-11, f"{layout}, scores ~{offset:g}: {errors}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("layout", placement.LAYOUTS)
def test_gradcheck_of_the_ring_operator(layout):
    group = cp_group()
    tokens = 2 * group.size  # 2 per rank: zigzag's two chunks of one token
    inputs = [Tensor(mine(x, group, layout), requires_grad=True) for x in qkv(2, (1, 2, tokens, 2))]
    dropout = nn.Dropout(0.3, seed=5)

    def attend(q, k, v):
        dropout.counter = 0  # the same mask on every evaluation
        return ring_attention(q, k, v, group=group, layout=layout, dropout=dropout)

    result = gradcheck(attend, inputs, comm=group.comm)
    parallel_assert(result.entries == 3 * 2 * tokens * 2, f"every entry of q, k, v on every rank: {result}")
    parallel_assert(result.max_error <= GRADCHECK, str(result))


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("layout", placement.LAYOUTS)
def test_ring_bytes_equal_the_formula(layout):
    """Forward: K and V of s/cp tokens, cp - 1 hops: 2(cp-1)·(s/cp)·b·h·e. Backward: K and V again, and
    the dK, dV accumulators home: 4(cp-1)·(s/cp)·b·h·e. Every message one sendrecv over cp."""
    group = cp_group()
    cp, block = group.size, (S // group.size) * B * A * D * 8  # (s/cp)·b·h·e, h = a·d, float64
    leaves = [Tensor(mine(x, group, layout), requires_grad=True) for x in qkv()]
    with comm.log_collectives() as forward:
        out = ring_attention(*leaves, group=group, layout=layout)
    with comm.log_collectives() as backward:
        out.backward(numpy.ones(out.shape))
    # backward messages: K,V after step 1, K,V + dK,dV after steps 2..cp-1, dK,dV home after the last
    messages_back = cp if cp > 1 else 0
    for log, messages, formula in ((forward, cp - 1, 2 * (cp - 1) * block), (backward, messages_back, 4 * (cp - 1) * block)):
        parallel_assert(all(r.op == "sendrecv" and r.group == "cp" for r in log), log.table())
        parallel_assert(len(log) == messages, log.table())
        parallel_assert(log.total_ring_bytes() == formula, f"{log.total_ring_bytes()} vs {formula}:\n{log.table()}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_a_sequence_zigzag_cannot_cut_is_refused_on_every_rank_before_communicating():
    group = cp_group()
    leaves = [Tensor(x) for x in qkv(shape=(1, 1, 3, 2))]  # 3 tokens per rank: s = 3·cp, not 2·cp chunks
    with comm.log_collectives() as log:
        try:
            ring_attention(*leaves, group=group, layout="zigzag")
            error = None
        except ValueError as raised:
            error = str(raised)
    parallel_assert(error is not None and f"2·{group.size}" in error and len(log) == 0, f"{error}")


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_zigzag_balances_the_causal_work(cp):
    """Attended (query, key) pairs per rank: every causal pair once over the ranks; zigzag gives every rank
    (2cp-1)c² + c(c+1) for chunks of c tokens, contiguous blocks of C tokens give rank r r·C² + C(C+1)/2."""
    s = 64
    for layout in placement.LAYOUTS:
        work = [attended_pairs(r, cp, s, layout) for r in range(cp)]
        assert sum(work) == s * (s + 1) // 2, f"{layout}: every causal pair once"
    zigzag = [attended_pairs(r, cp, s, "zigzag") for r in range(cp)]
    c = s // (2 * cp)
    assert zigzag == [(2 * cp - 1) * c * c + c * (c + 1)] * cp
    contiguous = [attended_pairs(r, cp, s) for r in range(cp)]
    C = s // cp
    assert contiguous == [r * C * C + C * (C + 1) // 2 for r in range(cp)]
    # the last over the first: 1 + 2(cp-1)·C/(C+1), which tends to 2cp - 1 for long blocks
    assert contiguous[-1] / contiguous[0] == pytest.approx(1 + 2 * (cp - 1) * C / (C + 1))


def test_blocks_wholly_in_the_future_are_skipped():
    # contiguous, cp = 4: rank 0 attends only its own block; rank 3 all four, the diagonal one masked
    assert [len(blocks) for _, blocks in ring_schedule(0, 4, 16)] == [1, 0, 0, 0]
    rank3 = ring_schedule(3, 4, 16)
    assert [source for source, _ in rank3] == [3, 2, 1, 0]
    assert [[block.masked for block in blocks] for _, blocks in rank3] == [[True], [False], [False], [False]]
    # zigzag: every step has work; rank 0's own step holds both diagonals and one skipped pair
    zigzag = ring_schedule(0, 4, 16, "zigzag")
    assert all(blocks for _, blocks in zigzag)
    assert [(b.q_run, b.k_run, b.masked) for b in zigzag[0][1]] == [((0, 2), (0, 2), True), ((14, 16), (0, 2), False),
                                                                   ((14, 16), (14, 16), True)]
