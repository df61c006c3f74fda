"""Softmax attention one block of keys at a time: what a block gives, how two blocks merge, and the
backward of one block from the whole row's log-sum-exp. Blockwise attention (``blockwise_attention``,
blocks of keys on one rank) and ring attention (``minitp.parallel.context.ring``, blocks of keys on
other ranks) are both loops over these three functions.

Shapes: scaled_q (..., lq, d) = q/√d, k and v (..., lk, d); a block's output (..., lq, d), its lse (..., lq).

**A block.** Attention of a query row over a block B of keys gives the row's output normalised over B
alone, O_B = Σ_{j∈B} e^(s_j - m) v_j / Σ_{j∈B} e^(s_j - m) (m = max_B s_j, so no exp overflows), and
lse_B = m + log Σ_{j∈B} e^(s_j - m), the log of the block's share of the softmax denominator.

**Two blocks merge exactly** (Milakov and Gimelshein's online softmax; FlashAttention's rescaling),
since e^lse is the denominator: lse = log(e^lse_1 + e^lse_2), O = e^(lse_1 - lse) O_1 + e^(lse_2 - lse) O_2.

**Backward of a block** needs only the row's final lse and Δ = rowsum(dO ∘ O): the block's
probabilities are P = e^(s - lse) -- exact, lse being the whole row's -- and with dP = dO vᵀ,
dS = P ∘ (dP - Δ) (softmax's backward, Σ_j P_j dP_j = dO·O = Δ). Then dq = dS k/√d, dk = dSᵀ q/√d,
dv = Pᵀ dO. Attention dropout multiplies P by keep/(1 - p) after the softmax: dv takes the dropped P,
dP is dropped too, and lse stays the undropped one (as in FlashAttention).
"""
import numpy

from minitp import backend
from minitp.functional import precision
from minitp.functional.precision import product


def attend(scaled_q, k, v, future=None, keep=None):
    """(O_B, lse_B) of the queries against one block of keys, from the module's docstring.

    ``future``: None, or a (lq, lk) array of 0 and -inf added to the scores (the causal mask where the
    block straddles the diagonal). ``keep``: None, or the block's dropout mask already scaled by
    1/(1 - p), (..., lq, lk). Every row must keep at least one key (the caller's blocks see to it)."""
    xp = backend.array_module(scaled_q)
    scores = product(scaled_q, xp.swapaxes(k, -1, -2))  # (..., lq, lk), a fresh buffer: worked in place below
    if future is not None:
        scores += future
    top = scores.max(axis=-1, keepdims=True)
    scores -= top
    xp.exp(scores, out=scores)  # e^(s - m): unnormalised probabilities
    total = precision.total(scores, axis=-1, keepdims=True)
    if keep is not None:
        scores *= keep
    out = product(scores, v)
    out /= total  # normalise the (lq, d) output rather than the (lq, lk) probabilities: the same numbers
    xp.log(total, out=total)
    total += top
    return out, total[..., 0]


def merge(out, lse, block_out, block_lse):
    """Fold a block's (normalised output, lse) into the running ones, in place (``out``, ``lse`` may be
    views into the full arrays).

    lse_new = log(e^lse + e^lse_B), computed as m + log(e^(lse-m) + e^(lse_B-m)) with m the larger;
    each output is weighted by its share of the new denominator, e^(lse - lse_new). lse = -inf (no keys
    yet) weighs 0."""
    xp = backend.array_module(out)
    new = xp.maximum(lse, block_lse)
    new += xp.log(xp.exp(lse - new) + xp.exp(block_lse - new))
    out *= xp.exp(lse - new)[..., None]
    out += xp.exp(block_lse - new)[..., None] * block_out
    lse[...] = new


def attend_backward(scaled_q, k, v, grad_out, lse, delta, scale, future=None, keep=None):
    """(dq, dk, dv) of one block, from the row's final ``lse`` and ``delta`` = rowsum(dO ∘ O), both
    (..., lq); ``scale`` = 1/√d (dq = dS k·scale; dk = dSᵀ scaled_q already carries it)."""
    xp = backend.array_module(scaled_q)
    probs = product(scaled_q, xp.swapaxes(k, -1, -2))
    if future is not None:
        probs += future
    probs -= lse[..., None]
    xp.exp(probs, out=probs)  # P = e^(s - lse): the probabilities, recomputed
    grad_probs = product(grad_out, xp.swapaxes(v, -1, -2))  # dP = dO vᵀ
    if keep is not None:
        grad_probs *= keep
        dropped = probs * keep
        grad_v = product(xp.swapaxes(dropped, -1, -2), grad_out)
        del dropped
    else:
        grad_v = product(xp.swapaxes(probs, -1, -2), grad_out)
    grad_probs -= delta[..., None]
    grad_probs *= probs  # dS = P ∘ (dP - Δ), in dP's buffer
    grad_q = product(grad_probs, k)
    grad_q *= scale
    return grad_q, product(xp.swapaxes(grad_probs, -1, -2), scaled_q), grad_v


def future_bias(q_run, k_run, xp, dtype):
    """(lq, lk) of 0 and -inf: -inf where the key's global position comes after the query's."""
    future = xp.arange(*k_run)[None, :] > xp.arange(*q_run)[:, None]
    return xp.where(future, -numpy.inf, 0).astype(dtype)
