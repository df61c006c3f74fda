"""What are the forward and backward of the nonlinearities: GeLU (the MLP's), softmax (attention's) and
log-softmax, and what does each keep for backward?"""
import math

from minitp import backend
from minitp.autograd import Function
from minitp.blocks import blocks, row_blocks


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


class GeLU(Function):
    """The Gaussian error linear unit, y = x Phi(x), the MLP's nonlinearity (Megatron: Y = GeLU(XA)).

    ``approximate="tanh"`` is GPT-2's 0.5 x (1 + tanh(u)), u = sqrt(2/pi)(x + 0.044715 x^3), whose
    derivative is 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi)(1 + 3 * 0.044715 x^2).
    ``approximate="none"`` is exact: Phi(x) = 0.5 (1 + erf(x / sqrt 2)), dy/dx = Phi(x) + x phi(x)
    with phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Saves only its input (the paper counts GeLU's input, 8sbh bytes of its 19sbh MLP) and recomputes
    tanh or erf in backward.

    The tanh form runs a block of the flattened array at a time (``minitp.blocks``: every
    pass after the first reads from the L2 cache) in fresh buffers, with ``x ** 3`` (a general power in
    numpy, several times the cost of a multiplication) rewritten as x (c + ck x^2).
    """

    def forward(self, x, approximate="tanh"):
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', not {approximate!r}")
        self.approximate = approximate
        self.save_for_backward(x)
        xp = backend.array_module(x)
        if approximate == "none":
            return 0.5 * x * (1 + backend.erf(x * (1 / math.sqrt(2))))
        flat = x.reshape(-1)  # a 0-d x becomes (1,), so the in-place updates have a buffer
        y = xp.empty_like(flat)
        for part in blocks(flat.size, xp):
            x_, y_ = flat[part], y[part]
            _tanh_of_argument(x_, y_, xp)
            y_ += 1
            y_ *= x_
            y_ *= 0.5  # 0.5 x (1 + tanh u)
        return y.reshape(x.shape)

    def backward(self, grad):
        (x,) = self.saved
        xp = backend.array_module(x)
        if self.approximate == "none":
            cdf = 0.5 * (1 + backend.erf(x * (1 / math.sqrt(2))))
            return grad * (cdf + x * xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi)))
        shape, x, grad = x.shape, x.reshape(-1), grad.reshape(-1)  # (1,) for a 0-d x, as in forward
        grad_x = xp.empty_like(x)
        parts = blocks(x.size, xp)
        t, one_minus_t = xp.empty_like(x[parts[0]]), xp.empty_like(x[parts[0]])  # block-sized scratch
        for part in parts:
            x_, g_, slope = x[part], grad[part], grad_x[part]
            t_, one_minus_t_ = t[:len(x_)], one_minus_t[:len(x_)]
            # slope = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx = (1 + t) (0.5 + a (1 - t)) with
            # a = 0.5 x du/dx = x (0.5c + 1.5ck x^2), c = sqrt(2/pi), t = tanh u
            _tanh_of_argument(x_, t_, xp)
            xp.multiply(x_, x_, out=slope)
            slope *= 1.5 * _SQRT_2_OVER_PI * _GELU_CUBIC
            slope += 0.5 * _SQRT_2_OVER_PI
            slope *= x_
            xp.subtract(1, t_, out=one_minus_t_)
            slope *= one_minus_t_
            slope += 0.5
            t_ += 1
            slope *= t_
            slope *= g_
        return grad_x.reshape(shape)


class Softmax(Function):
    """softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j (so no exp overflows).

    Backward: dy_i/dx_j = y_i (delta_ij - y_j), so dx = y * (g - sum(g * y)): only the output is needed,
    and only the output is saved (the paper's 2as^2b bytes for attention's softmax).

    Both directions run a block of whole rows at a time (``minitp.blocks``), each pass
    writing into the fresh output: no temporary of the (b, a, s, s) scores' size.
    """

    def forward(self, x, axis=-1):
        xp = backend.array_module(x)
        self.axis = axis
        rows = _rows(x, axis, xp)  # (rows, n): the softmax axis last
        y = xp.empty_like(rows)
        for part in row_blocks(*rows.shape, xp):
            x_, y_ = rows[part], y[part]
            xp.subtract(x_, x_.max(axis=-1, keepdims=True), out=y_)
            xp.exp(y_, out=y_)
            y_ /= y_.sum(axis=-1, keepdims=True)
        y = _unrows(y, x.shape, axis, xp)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        xp = backend.array_module(y)
        y_rows, grad_rows = _rows(y, self.axis, xp), _rows(grad, self.axis, xp)
        grad_x = xp.empty_like(y_rows)
        for part in row_blocks(*y_rows.shape, xp):
            y_, g_, out = y_rows[part], grad_rows[part], grad_x[part]
            xp.multiply(g_, y_, out=out)
            xp.subtract(g_, out.sum(axis=-1, keepdims=True), out=out)  # g - sum(g y)
            out *= y_
        return _unrows(grad_x, y.shape, self.axis, xp)


def _rows(x, axis, xp):
    """``x`` as (rows, n) with ``axis`` (length n) last: a view for the last axis of a contiguous array."""
    x = xp.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1])


def _unrows(rows, shape, axis, xp):
    """The inverse of ``_rows``: (rows, n) back to ``shape``, n at ``axis`` (a view)."""
    axis %= len(shape)
    return xp.moveaxis(rows.reshape(shape[:axis] + shape[axis + 1:] + shape[axis:axis + 1]), -1, axis)


class LogSoftmax(Function):
    """log_softmax(x) = x - m - log sum_j exp(x_j - m), m = max_j x_j.

    Backward: dy_i/dx_j = delta_ij - softmax_j, so dx = g - exp(y) * sum(g): the output alone suffices.
    """

    def forward(self, x, axis=-1):
        xp = backend.array_module(x)
        self.axis = axis
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        xp = backend.array_module(y)
        return grad - xp.exp(y) * grad.sum(axis=self.axis, keepdims=True)


def _tanh_of_argument(x, out, xp):
    """out = tanh(u), u = sqrt(2/pi) (x + k x^3) = x (c + ck x^2) with c = sqrt(2/pi): five passes."""
    xp.multiply(x, x, out=out)
    out *= _SQRT_2_OVER_PI * _GELU_CUBIC
    out += _SQRT_2_OVER_PI
    out *= x
    xp.tanh(out, out=out)


def gelu(x, approximate="tanh"):
    return GeLU.apply(x, approximate=approximate)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)

