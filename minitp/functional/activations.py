"""What are the forward and backward of the nonlinearities: GeLU (the MLP's), softmax (attention's) and
log-softmax, and what does each keep for backward?"""
import math

from minitp import backend
from minitp.autograd import Function


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

    The tanh form is written with in-place updates of fresh buffers: it runs on the MLP's 4sbh-sized
    activations, where each temporary costs a pass over memory, and ``x ** 3`` (a general power in
    numpy, several times the cost of a multiplication) is rewritten x (1 + k x^2).
    """

    def forward(self, x, approximate="tanh"):
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', not {approximate!r}")
        self.approximate = approximate
        self.save_for_backward(x)
        xp = backend.array_module(x)
        if approximate == "tanh":
            flat = x.reshape(-1)  # a view; a 0-d x becomes (1,), so the in-place updates have a buffer
            y = _gelu_tanh_argument(flat, xp)
            xp.tanh(y, out=y)
            y += 1
            y *= flat
            y *= 0.5  # 0.5 x (1 + tanh u)
            return y.reshape(x.shape)
        return 0.5 * x * (1 + backend.erf(x * (1 / math.sqrt(2))))

    def backward(self, grad):
        (x,) = self.saved
        xp = backend.array_module(x)
        if self.approximate == "tanh":
            shape, x, grad = x.shape, x.reshape(-1), grad.reshape(-1)  # (1,) for a 0-d x, as in forward
            t = _gelu_tanh_argument(x, xp)
            xp.tanh(t, out=t)
            # slope = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3k x^2), built in three buffers
            du = x * x
            du *= 3 * _GELU_CUBIC
            du += 1
            du *= x
            du *= 0.5 * _SQRT_2_OVER_PI  # 0.5 x du/dx
            slope = t * t
            xp.subtract(1, slope, out=slope)
            slope *= du
            t += 1
            t *= 0.5
            slope += t
            slope *= grad
            return slope.reshape(shape)
        else:
            cdf = 0.5 * (1 + backend.erf(x * (1 / math.sqrt(2))))
            slope = cdf + x * xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return grad * slope


class Softmax(Function):
    """softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j (so no exp overflows).

    Backward: dy_i/dx_j = y_i (delta_ij - y_j), so dx = y * (g - sum(g * y)): only the output is needed,
    and only the output is saved (the paper's 2as^2b bytes for attention's softmax).
    """

    def forward(self, x, axis=-1):
        xp = backend.array_module(x)
        self.axis = axis
        y = x - x.max(axis=axis, keepdims=True)
        xp.exp(y, out=y)  # in place: the (b, a, s, s) scores are the largest activation of a layer
        y /= y.sum(axis=axis, keepdims=True)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        grad_x = grad * y  # y * (g - sum(g * y)) = g y - y sum(g y): one score-sized buffer fewer
        grad_x -= y * grad_x.sum(axis=self.axis, keepdims=True)
        return grad_x


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


def _gelu_tanh_argument(x, xp):
    """u = sqrt(2/pi) (x + k x^3) = sqrt(2/pi) x (1 + k x^2), in a new array."""
    u = x * x
    u *= _GELU_CUBIC
    u += 1
    u *= x
    u *= _SQRT_2_OVER_PI
    return u


def gelu(x, approximate="tanh"):
    return GeLU.apply(x, approximate=approximate)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)

