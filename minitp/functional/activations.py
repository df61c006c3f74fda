"""What are the forward and backward of the nonlinearities: GeLU (the MLP's), softmax (attention's) and
log-softmax, and what does each keep for backward?"""
import math

import numpy

from minitp import backend, kernels
from minitp.autograd import Function
from minitp.blocks import blocks, row_blocks
from minitp.functional.precision import compute_dtype, total


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


class GeLU(Function):
    """The Gaussian error linear unit, y = x Phi(x), the MLP's nonlinearity (Megatron: Y = GeLU(XA)).

    ``approximate="tanh"`` is GPT-2's 0.5 x (1 + tanh(u)), u = sqrt(2/pi)(x + 0.044715 x^3).
    ``approximate="none"`` is exact: Phi(x) = 0.5 (1 + erf(x / sqrt 2)), dy/dx = Phi(x) + x phi(x)
    with phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Saves only its input (the paper counts GeLU's input, 8sbh bytes of its 19sbh MLP) and recomputes
    the nonlinearity in backward.

    The tanh form is computed through the identity 0.5 (1 + tanh u) = sigma(2u) = 1 / (1 + e^(-2u)),
    so y = x / (1 + e^(-2u)) and dy/dx = sigma + x sigma (1 - sigma) 2 du/dx -- the same function, with
    numpy's exp in place of its tanh, which costs more (measured on GeLU's arguments: 3.5 against 2.4 ns
    per float32, 16 against 6 per float64; GeLU's forward+backward took 25% less time in float32 and 48%
    less in float64). For x below about -10 in float32 (-21 in float64) e^(-2u) overflows to inf and y
    to -0, its limit: numpy's overflow warning is silenced there.

    It runs a block of the flattened array at a time (``minitp.blocks``: every pass after the first
    reads from the L2 cache) in fresh buffers, with ``x ** 3`` (a general power in numpy, several times
    the cost of a multiplication) rewritten as x (c + ck x^2). A 2-byte float on numpy is computed in
    fp32 (``precision.compute_dtype``): each block widened, the passes in fp32 block-sized scratch, the
    block's output rounded once.
    """

    def forward(self, x, approximate="tanh"):
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', not {approximate!r}")
        self.approximate = approximate
        self.save_for_backward(x)
        xp = backend.array_module(x)
        wide = compute_dtype(x)  # float32 for a 2-byte float on numpy, else x.dtype
        if approximate == "none":
            x_ = x.astype(wide, copy=False)
            return (0.5 * x_ * (1 + backend.erf(x_ * (1 / math.sqrt(2))))).astype(x.dtype, copy=False)
        if kernels.enabled(x):  # on a GPU: the formula below in one pass (minitp.kernels)
            from minitp.kernels.elementwise import bias_gelu_forward
            return bias_gelu_forward(x)
        flat = x.reshape(-1)  # a 0-d x becomes (1,), so the in-place updates have a buffer
        y = xp.empty_like(flat)
        with numpy.errstate(over="ignore"):
            for part in blocks(flat.size, xp):
                x_, y_ = flat[part], y[part]
                if wide != y.dtype:  # 2-byte floats: the block widened, computed in fp32, rounded once
                    x_, y_ = x_.astype(wide), xp.empty(x_.shape, wide)
                _exp_of_minus_2u(x_, y_, xp)
                y_ += 1
                xp.divide(x_, y_, out=y_)  # x sigma(2u) = x / (1 + e^(-2u))
                if y_.dtype != y.dtype:
                    y[part] = y_
        return y.reshape(x.shape)

    def backward(self, grad):
        (x,) = self.saved
        xp = backend.array_module(x)
        dtype, wide = grad.dtype, compute_dtype(x)  # float32 for a 2-byte float on numpy, else x.dtype
        if self.approximate == "none":
            x, grad = x.astype(wide, copy=False), grad.astype(wide, copy=False)
            cdf = 0.5 * (1 + backend.erf(x * (1 / math.sqrt(2))))
            return (grad * (cdf + x * xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi)))).astype(dtype, copy=False)
        if kernels.enabled(x):
            from minitp.kernels.elementwise import bias_gelu_backward
            return bias_gelu_backward(x, grad)
        shape, x, grad = x.shape, x.reshape(-1), grad.reshape(-1)  # (1,) for a 0-d x, as in forward
        grad_x = xp.empty_like(x)
        parts = blocks(x.size, xp)
        sigma, one_minus_sigma = xp.empty_like(x[parts[0]]), xp.empty_like(x[parts[0]])  # block-sized scratch
        if wide != x.dtype:  # 2-byte floats: fp32 scratch, the slope too, each block rounded once
            sigma, one_minus_sigma, slopes = (xp.empty(x[parts[0]].shape, wide) for _ in range(3))
        with numpy.errstate(over="ignore"):
            for part in parts:
                x_, g_, slope = x[part], grad[part], grad_x[part]
                s_, one_minus_s_ = sigma[:len(x_)], one_minus_sigma[:len(x_)]
                if wide != x.dtype:
                    x_, g_, slope = x_.astype(wide), g_.astype(wide), slopes[:len(x_)]
                # slope = sigma + x sigma (1 - sigma) 2 du/dx = sigma (1 + (1 - sigma) x (2c + 6ck x^2)),
                # sigma = sigma(2u), c = sqrt(2/pi)
                _exp_of_minus_2u(x_, s_, xp)
                s_ += 1
                xp.reciprocal(s_, out=s_)
                xp.multiply(x_, x_, out=slope)
                slope *= 6 * _SQRT_2_OVER_PI * _GELU_CUBIC
                slope += 2 * _SQRT_2_OVER_PI
                slope *= x_
                xp.subtract(1, s_, out=one_minus_s_)
                slope *= one_minus_s_
                slope += 1
                slope *= s_
                slope *= g_
                if slope.dtype != grad_x.dtype:
                    grad_x[part] = slope
        return grad_x.reshape(shape)


class Softmax(Function):
    """softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j (so no exp overflows).

    Backward: dy_i/dx_j = y_i (delta_ij - y_j), so dx = y * (g - sum(g * y)): only the output is needed,
    and only the output is saved (the paper's 2as^2b bytes for attention's softmax).

    Both directions run a block of whole rows at a time (``minitp.blocks``), each pass
    writing into the fresh output: no temporary of the (b, a, s, s) scores' size. A 2-byte float on
    numpy is computed in fp32 (``precision.compute_dtype``): each block widened, the passes in fp32,
    the block's output rounded once.
    """

    def forward(self, x, axis=-1):
        xp = backend.array_module(x)
        self.axis = axis
        if kernels.enabled(x) and axis % x.ndim == x.ndim - 1:  # on a GPU: one pass per row
            from minitp.kernels.rows import softmax_forward
            y = softmax_forward(x)
            self.save_for_backward(y)
            return y
        rows = _rows(x, axis, xp)  # (rows, n): the softmax axis last
        y = xp.empty_like(rows)
        wide = compute_dtype(x)  # float32 for a 2-byte float on numpy, else x.dtype
        for part in row_blocks(*rows.shape, xp):
            x_, y_ = rows[part], y[part]
            if wide != y.dtype:  # 2-byte floats: the block widened, computed in fp32, rounded once
                x_ = x_.astype(wide)  # in x_'s memory order, as y's block: numpy sums in the same order
                y_ = xp.empty_like(x_)
            xp.subtract(x_, x_.max(axis=-1, keepdims=True), out=y_)
            xp.exp(y_, out=y_)
            y_ /= total(y_, axis=-1, keepdims=True)
            if y_.dtype != y.dtype:
                y[part] = y_
        y = _unrows(y, x.shape, axis, xp)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        xp = backend.array_module(y)
        if kernels.enabled(y) and self.axis % y.ndim == y.ndim - 1:
            from minitp.kernels.rows import softmax_backward
            return softmax_backward(y, grad)
        y_rows, grad_rows = _rows(y, self.axis, xp), _rows(grad, self.axis, xp)
        grad_x = xp.empty_like(y_rows)
        wide = compute_dtype(y)
        for part in row_blocks(*y_rows.shape, xp):
            y_, g_, out = y_rows[part], grad_rows[part], grad_x[part]
            if wide != grad_x.dtype:  # 2-byte floats: the block widened, computed in fp32, rounded once
                y_, g_ = y_.astype(wide), g_.astype(wide)  # in their memory order, as grad_x's block
                out = xp.empty_like(y_)
            xp.multiply(g_, y_, out=out)
            xp.subtract(g_, total(out, axis=-1, keepdims=True), out=out)  # g - sum(g y)
            out *= y_
            if out.dtype != grad_x.dtype:
                grad_x[part] = out
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
    A 2-byte float on numpy is computed in fp32 and rounded once (``precision.compute_dtype``).
    """

    def forward(self, x, axis=-1):
        xp = backend.array_module(x)
        self.axis = axis
        dtype, x = x.dtype, x.astype(compute_dtype(x), copy=False)  # fp32 for 2-byte floats on numpy
        shifted = x - x.max(axis=axis, keepdims=True)
        y = (shifted - xp.log(total(xp.exp(shifted), axis=axis, keepdims=True))).astype(dtype, copy=False)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        xp = backend.array_module(y)
        dtype, wide = grad.dtype, compute_dtype(y)
        y, grad = y.astype(wide, copy=False), grad.astype(wide, copy=False)
        return (grad - xp.exp(y) * total(grad, axis=self.axis, keepdims=True)).astype(dtype, copy=False)


def _exp_of_minus_2u(x, out, xp):
    """out = e^(-2u), u = sqrt(2/pi) (x + k x^3), so -2u = x (-2c - 2ck x^2) with c = sqrt(2/pi): five passes."""
    xp.multiply(x, x, out=out)
    out *= -2 * _SQRT_2_OVER_PI * _GELU_CUBIC
    out += -2 * _SQRT_2_OVER_PI
    out *= x
    xp.exp(out, out=out)


def gelu(x, approximate="tanh"):
    return GeLU.apply(x, approximate=approximate)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)

