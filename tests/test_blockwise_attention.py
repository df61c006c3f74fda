"""Blockwise attention (minitp.functional.blockwise_attention) against the dense core it replaces
(minitp.functional.attention_core, the readable definition), in float64: the same output and
gradients to 1e-12, attention dropout included (the same mask elements), and only O(s·b·h) kept."""
import numpy
import pytest

from minitp import backend, nn, track_saved
from minitp import functional as F
from minitp.autograd import Tensor
from minitp.functional.blockwise_attention import BLOCK, block_pairs, blockwise_attention
from minitp.functional.online_softmax import attend, merge
from minitp.testing import gradcheck, max_error

EXACT = 1e-12


def host(value):
    return backend.to_host(value.data if isinstance(value, Tensor) else value)


def tensors(shape, seed, scale=1.0):
    rng = numpy.random.default_rng(seed)
    return [Tensor(backend.from_host(scale * rng.standard_normal(shape)), requires_grad=True) for _ in range(3)]


def run(attention, q, k, v, upstream):
    """(output, dq, dk, dv) on the host, from fresh leaves over the same arrays."""
    leaves = [Tensor(x.data, requires_grad=True) for x in (q, k, v)]
    out = attention(*leaves)
    out.backward(upstream)
    return [host(out)] + [host(leaf.grad) for leaf in leaves]


def dense(causal, dropout=None):
    return lambda q, k, v: F.attention_core(q, k, v, causal, dropout)


def blockwise(causal, block, dropout=None):
    def attention(q, k, v):
        keep = None if dropout is None else dropout.block_drawer(
            (q.shape[0], q.shape[1], q.shape[2], q.shape[2]), q.dtype, backend.array_module(q.data))
        return blockwise_attention(q, k, v, causal, keep, block)
    return attention


@pytest.mark.parametrize("seq, block", [(8, 8), (8, 3), (7, 2), (9, 4), (5, 1), (6, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_equals_the_dense_core(device, seq, block, causal):
    """Output and the three gradients, s a multiple of the block or not, one block or one per position."""
    q, k, v = tensors((2, 3, seq, 4), seq)
    upstream = backend.from_host(numpy.random.default_rng(1).standard_normal(q.shape))
    expected = run(dense(causal), q, k, v, upstream)
    got = run(blockwise(causal, block), q, k, v, upstream)
    errors = [max_error(g, e) for g, e in zip(got, expected)]
    assert max(errors) <= EXACT, errors


@pytest.mark.parametrize("splits, microbatch", [((), (0, 1)), (((1, 1, 2),), (0, 1)), ((), (1, 2))])
def test_dropout_draws_the_dense_cores_mask(device, splits, microbatch):
    """With attention dropout on, blockwise drops exactly the elements the dense core's Dropout drops:
    serially, on heads [2, 4) of 4 (a head-parallel rank's placement), and as microbatch 1 of 2 (whose
    call also moves the counter on, as the module's own call does)."""
    q, k, v = tensors((2, 2, 9, 3), 5)
    upstream = backend.from_host(numpy.random.default_rng(2).standard_normal(q.shape))
    results, counters = [], []
    for attention in (dense, lambda causal, dropout: blockwise(causal, 4, dropout)):
        dropout = nn.Dropout(0.3, seed=11, splits=splits, batch_axis=0)
        dropout.microbatch = microbatch
        results.append(run(attention(True, dropout), q, k, v, upstream))
        counters.append(dropout.counter)
    errors = [max_error(g, e) for g, e in zip(*results)]
    assert max(errors) <= EXACT, errors
    assert counters[0] == counters[1] == (1 if microbatch[0] == microbatch[1] - 1 else 0)
    undropped = run(dense(True), q, k, v, upstream)[0]
    assert max_error(results[1][0], undropped) > 1e-3  # the dropout was really on


def test_gradcheck():
    q, k, v = tensors((1, 2, 5, 3), 3)
    dropout = nn.Dropout(0.25, seed=4)

    def attention(q, k, v):
        dropout.counter = 0  # the same mask on every evaluation
        return blockwise(True, 2, dropout)(q, k, v)
    result = gradcheck(attention, [q, k, v])
    assert result.max_error <= 1e-6, result


@pytest.mark.parametrize("offset", [1e3, -1e3])
def test_scores_beyond_exps_range(offset):
    """Scores of about ±1000 (e^1000 overflows float64): each block subtracts its row max and the merge
    the larger lse, so nothing overflows and the result is the dense core's."""
    q, k, v = tensors((1, 2, 8, 3), 6)
    q.data[..., -1], k.data[..., -1] = offset * 3 ** 0.5, 1.0
    upstream = backend.from_host(numpy.random.default_rng(3).standard_normal(q.shape))
    expected = run(dense(True), q, k, v, upstream)
    got = run(blockwise(True, 3), q, k, v, upstream)
    assert all(numpy.isfinite(x).all() for x in got)
    # relative: dk's last column is ~1e3, and a score of ~1e3 carries ~1e3·eps of rounding
    assert max(max_error(g, e) / max(1.0, numpy.abs(e).max()) for g, e in zip(got, expected)) <= 1e-11


def test_merge_of_two_blocks_is_the_softmax_over_both():
    """The one merge that ring attention and blockwise attention share: two halves of the keys, each
    attended alone and merged, give the softmax over all of them."""
    rng = numpy.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    out, lse = attend(q, k[:, :2], v[:, :2])
    merge(out, lse, *attend(q, k[:, 2:], v[:, 2:]))
    scores = q @ k.swapaxes(-1, -2)
    probs = numpy.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert max_error(out, probs @ v) <= EXACT
    assert max_error(lse, numpy.log(numpy.exp(scores).sum(-1))) <= EXACT


def test_causal_blocks_above_the_diagonal_are_skipped():
    pairs = block_pairs(10, 4, causal=True)
    assert pairs == [((0, 4), [(0, 4)]), ((4, 8), [(0, 4), (4, 8)]), ((8, 10), [(0, 4), (4, 8), (8, 10)])]
    assert sum(len(keys) for _, keys in block_pairs(10, 4, causal=False)) == 9


@pytest.mark.parametrize("seq", [16, 40])
def test_keeps_q_k_v_the_output_and_one_lse_per_row(seq):
    """What backward keeps: (4d + 1)·b·a·s numbers (q, k, v, O and the lse), no (s, s) array."""
    batch, heads, d = 2, 3, 4
    q, k, v = tensors((batch, heads, seq, d), 8)
    with track_saved() as saved:
        blockwise_attention(q, k, v, True, None, 8)
    assert saved.total == (4 * d + 1) * batch * heads * seq * 8
    assert BLOCK >= 1


def test_refuses_mismatched_shapes():
    q, k, v = tensors((1, 2, 4, 3), 9)
    with pytest.raises(ValueError, match="one shape"):
        blockwise_attention(q, Tensor(k.data[:, :, :3]), v)


def test_attention_picks_the_core_the_benchmark_measured_faster(monkeypatch):
    """``F.attention``'s default (``default_kind``): blockwise only where it skips blocks on numpy (causal,
    two blocks or more); ``MINITP_ATTENTION`` overrides it, and a kind it does not know is refused."""
    from minitp.functional.attention import default_kind
    monkeypatch.delenv("MINITP_ATTENTION", raising=False)
    assert default_kind(BLOCK + 1, True, numpy) == "blockwise"
    assert default_kind(BLOCK, True, numpy) == default_kind(4 * BLOCK, False, numpy) == "dense"
    monkeypatch.setenv("MINITP_ATTENTION", "dense")
    assert default_kind(4 * BLOCK, True, numpy) == "dense"
    monkeypatch.setenv("MINITP_ATTENTION", "flash")
    with pytest.raises(ValueError, match="MINITP_ATTENTION"):
        default_kind(4 * BLOCK, True, numpy)
    q, k, v = tensors((1, 1, 4, 2), 10)
    with pytest.raises(ValueError, match="attention kind"):
        F.attention(q, k, v, True, None, kind="flash")
