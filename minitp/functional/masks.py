"""Which entries does an op drop or hide: dropout's random keep-mask, the same on any shard as in the
serial run, and attention's causal mask? Both zero entries and keep at most a bool mask for backward."""
import numpy

from minitp import backend, rng
from minitp.functional.precision import compute_dtype
from minitp.autograd import Function


# -- dropout --------------------------------------------------------------------------------------

class Dropout(Function):
    """y = x * mask / (1 - p), the mask a pure function of (seed, counter, global element index).

    The mask comes from ``minitp.rng.keep_mask``: a rank holding a block of the global tensor (a
    sequence shard under SP, a head shard of attention's (b, a, s, s) probabilities under TP) draws
    exactly its block of the serial mask, so sharded and serial runs drop the same elements.

    Backward: dx = g * mask / (1 - p). Saves only the bool mask, 1 byte per element: the paper's
    activation-memory count charges dropout masks at 1 byte (sbh per dropout, as^2b in attention).
    A 2-byte float on numpy is scaled in fp32 (``precision.compute_dtype``) and rounded once.
    """

    def forward(self, x, p, seed, counter, global_shape=None, offset=None, training=True):
        self.scale = 1 / (1 - p)
        if p == 0 or not training:
            return x  # the identity: no mask drawn, nothing saved
        mask = rng.keep_mask(x.shape, p, seed, counter, global_shape, offset, backend.array_module(x))
        self.save_for_backward(mask)
        return _masked(x, mask, self.scale)

    def backward(self, grad):
        if not self.saved:
            return grad
        (mask,) = self.saved
        return _masked(grad, mask, self.scale)


def _masked(x, mask, scale):
    """x * mask * scale; a 2-byte float on numpy widened to fp32, multiplied there, rounded once."""
    y = x.astype(compute_dtype(x), copy=False) * mask  # no copy of float32/float64 or of a CuPy array
    y *= scale
    return y.astype(x.dtype, copy=False)


def dropout(x, p, seed, counter, global_shape=None, offset=None, training=True):
    """Zero each entry of ``x`` with probability ``p`` and scale the rest by 1/(1-p).

    ``x`` may be a block of a larger global tensor of ``global_shape`` starting at ``offset`` (one start
    per axis); by default it is the whole tensor. ``p = 0`` or ``training=False`` is the identity.
    """
    rng.check_probability(p)
    return Dropout.apply(x, p=p, seed=seed, counter=counter, global_shape=global_shape, offset=offset,
                         training=training)


# -- attention's causal mask ----------------------------------------------------------------------

def _future_keys(s_q, s_k, xp):
    """(s_q, s_k) bool: True where the key comes after the query (key index > query index)."""
    return xp.arange(s_k)[None, :] > xp.arange(s_q)[:, None]


class CausalMask(Function):
    """scores (..., s_q, s_k) with every future key (key index > query index) set to -inf.

    -inf (not a large negative number) makes the softmax weight exactly 0; every row keeps its
    diagonal, so no row is all -inf. Backward: the masked entries are constants, so their gradient is
    0; the rest pass through. Nothing is saved: the mask is rebuilt from the shape.

    Both directions are one broadcast arithmetic pass with an (s_q, s_k) matrix, adding 0 or -inf
    (x + 0 is x, x + -inf is -inf) and multiplying by 1 or 0: several times faster in numpy than
    ``where`` with a broadcast mask, the same values (a -0.0 gradient where a 0.0 was aside).
    """

    def forward(self, scores):
        if scores.ndim < 2:
            raise ValueError(f"causal_mask takes scores (..., s_q, s_k), got shape {scores.shape}")
        xp = backend.array_module(scores)
        self.shape = scores.shape
        future = _future_keys(scores.shape[-2], scores.shape[-1], xp)
        zero, minus_infinity = xp.zeros((), dtype=scores.dtype), xp.asarray(-numpy.inf, dtype=scores.dtype)
        return scores + xp.where(future, minus_infinity, zero)  # (s_q, s_k), broadcast over the leading axes

    def backward(self, grad):
        xp = backend.array_module(grad)
        future = _future_keys(self.shape[-2], self.shape[-1], xp)
        return grad * (~future).astype(grad.dtype)


def causal_mask(scores):
    return CausalMask.apply(scores)

