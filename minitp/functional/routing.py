"""How does a mixture-of-experts layer choose experts for its tokens, drop what overflows, and send the
gradient back along the same routes?

Routing is in two parts. The *choice* is piecewise constant and has no gradient: the top-k experts of each
token (``top_k``) and whether each (token, choice) still fits its expert's capacity (``queue_positions``,
``capacity``). These work on the host, on integer arrays. The *values* are differentiable ops: a token's
rows picked for its experts (``F.getitem`` with an integer array: its backward adds the k gradients of a
token back into one row), the experts' weighted outputs added back into their tokens' rows
(``scatter_add_rows``, whose backward is the pick), and the router's log-sum-exp (``logsumexp``, for the
z-loss). The gradient reaches the router only through the values the choice selects: the gates.

Ties. ``top_k`` breaks a tie in probability by the lower expert index (a stable sort), so every rank that
holds the same logits makes the same choice. A finite-difference check that moves a logit across a tie
would see the choice jump: tests build their logits away from ties.
"""
import math

import numpy

from minitp import backend
from minitp.autograd import Function
from minitp.functional.precision import total


def top_k(scores, k):
    """The ``k`` largest entries of each row of ``scores`` (T, E) as expert indices (T, k), int64 on the
    host, largest first; a tie goes to the lower index. No gradient: a choice, not a value."""
    scores = numpy.asarray(backend.to_host(scores))
    return numpy.argsort(-scores, axis=-1, kind="stable")[:, :k].astype(numpy.int64)


def capacity(capacity_factor, tokens, k, experts):
    """Slots per expert: ⌈capacity_factor · tokens · k / E⌉ (Switch §2.2, GShard §2.2; rounded up, as
    Megatron-core's ``get_capacity``), ``tokens`` the tokens that compete for them. None: no limit."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * k / experts)


def queue_positions(choices, experts, before, totals):
    """Each (token, choice)'s place in its expert's queue, first come first served (T, k), int64.

    The queue's order is GShard's: every token's first choice before any token's second choice, and
    within one choice the tokens in order. ``choices`` (T, k) holds this rank's tokens, a contiguous run
    of that order; ``before`` (k, E) counts, per choice and expert, the assignments of the tokens before
    this run (other ranks' tokens earlier in the order: zero serially), ``totals`` (k, E) those of all
    tokens. So assignment (t, j) to expert e is at

        Σ_{j' < j} totals[j', e]  +  before[j, e]  +  #{t' < t of this run with choices[t', j] = e}

    and it is kept when that is below the capacity. The same number whichever rank computes it: the
    sharded layer drops exactly the serial layer's tokens."""
    T, k = choices.shape
    offsets = numpy.cumsum(totals, axis=0) - totals + before  # (k, E): where choice j's run starts in e's queue
    positions = numpy.empty((T, k), dtype=numpy.int64)
    for j in range(k):
        onehot = choices[:, j][:, None] == numpy.arange(experts)  # (T, E)
        earlier = numpy.cumsum(onehot, axis=0) - onehot  # this run's tokens before t with the same choice
        positions[:, j] = offsets[j, choices[:, j]] + earlier[numpy.arange(T), choices[:, j]]
    return positions


def counts(choices, experts):
    """(k, E): how many of the tokens chose each expert as their j-th choice."""
    return numpy.stack([numpy.bincount(column, minlength=experts) for column in choices.T]).astype(numpy.int64)


class ScatterAddRows(Function):
    """out[rows[i]] += y[i] into zeros of (n, ...): the combine of a token's k weighted expert outputs
    (a row that appears k times receives k sums; a row that appears never -- a token whose every choice
    was dropped -- stays zero, and the token keeps only its residual). Backward: each y[i] receives its
    row's gradient, ``grad[rows]``."""

    def forward(self, y, rows, n):
        self.rows = rows
        xp = backend.array_module(y)
        out = xp.zeros((n,) + y.shape[1:], dtype=y.dtype)
        xp.add.at(out, rows, y)
        return out

    def backward(self, grad):
        return grad[self.rows]


def scatter_add_rows(y, rows, n):
    """``ScatterAddRows``: ``rows`` an integer array on ``y``'s device (or the host: moved there)."""
    return ScatterAddRows.apply(y, rows=backend.array_module(y.data).asarray(rows), n=int(n))


class LogSumExp(Function):
    """log Σ_j exp(x_j) over ``axis``, computed as m + log Σ exp(x - m), m the maximum (no overflow).
    Backward: d/dx_j = softmax(x)_j, so dx = grad · softmax(x) (the softmax kept from forward)."""

    def forward(self, x, axis=-1):
        xp = backend.array_module(x)
        self.axis = axis
        m = x.max(axis=axis, keepdims=True)
        e = xp.exp(x - m)
        summed = total(e, axis=axis, keepdims=True)
        self.save_for_backward(e / summed)
        return (m + xp.log(summed)).squeeze(axis)

    def backward(self, grad):
        (softmax,) = self.saved
        return softmax * backend.array_module(grad).expand_dims(grad, self.axis)


def logsumexp(x, axis=-1):
    return LogSumExp.apply(x, axis=axis)
