"""Every differentiable op, each a ``Function`` with its forward and backward side by side.

Ops take Tensors (Python numbers are accepted where a tensor operand makes sense) and return Tensors.
Inside ``forward``/``backward`` everything is a raw array and ``xp`` is the array's own module (numpy or
CuPy), so one code path serves both backends. Shapes in comments follow the paper: s sequence,
b batch, h hidden, a heads, d = h/a head size.
"""
import builtins
import math

import numpy

from minitp import backend, rng
from minitp.autograd import Function, Tensor

# This module defines differentiable sum, max and pow; the helpers below need Python's own.
_python_sum, _python_max = builtins.sum, builtins.max


def _tensor(value, like):
    """A constant operand as a Tensor of ``like``'s dtype (so 2 * x stays float32 for float32 x)."""
    if isinstance(value, Tensor):
        return value
    return Tensor(backend.array_module(like.data).asarray(value, dtype=like.dtype))


def _operands(a, b):
    if not isinstance(a, Tensor):
        a = _tensor(a, b)
    if not isinstance(b, Tensor):
        b = _tensor(b, a)
    return a, b


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of numpy broadcasting.

    A dimension that broadcasting added (leading) or stretched (size 1) received the same input value
    at every position, so its gradient is the sum over those positions.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape) if axes else grad.reshape(shape)


# -- elementwise arithmetic -------------------------------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, grad):
        return unbroadcast(grad, self.shapes[0]), unbroadcast(grad, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, grad):
        return unbroadcast(grad, self.shapes[0]), unbroadcast(-grad, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        # d(ab)/da = b and d(ab)/db = a: keep only the factor the other gradient needs
        self.save_for_backward(b if self.needs_input_grad[0] else None,
                               a if self.needs_input_grad[1] else None)
        self.shapes = a.shape, b.shape
        return a * b

    def backward(self, grad):
        b, a = self.saved
        return (unbroadcast(grad * b, self.shapes[0]) if b is not None else None,
                unbroadcast(grad * a, self.shapes[1]) if a is not None else None)


class Div(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        self.shapes = a.shape, b.shape
        return a / b

    def backward(self, grad):
        a, b = self.saved
        grad_a = grad / b
        # d(a/b)/db = -a/b^2 = -(grad/b) * a / b
        grad_b = -grad_a * a / b if self.needs_input_grad[1] else None
        return (unbroadcast(grad_a, self.shapes[0]),
                unbroadcast(grad_b, self.shapes[1]) if grad_b is not None else None)


def add(a, b):
    return Add.apply(*_operands(a, b))


def sub(a, b):
    return Sub.apply(*_operands(a, b))


def mul(a, b):
    return Mul.apply(*_operands(a, b))


def div(a, b):
    return Div.apply(*_operands(a, b))


# -- matrix product -------------------------------------------------------------------------------

class MatMul(Function):
    """``a @ b`` for operands of two or more dimensions, batched and broadcast as in numpy.

    Backward of C = A B: dA = dC B^T and dB = A^T dC, each summed over broadcast batch dimensions.
    A weight shared by every batch entry, (s, b, h) @ (h, n), is one GEMM of (s*b, h) @ (h, n), not
    s GEMMs of (b, h) @ (h, n): BLAS is fastest on one large product.
    """

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul takes operands of 2 or more dimensions, got {a.shape} @ {b.shape}")
        self.save_for_backward(a if self.needs_input_grad[1] else None,
                               b if self.needs_input_grad[0] else None)
        self.shapes = a.shape, b.shape
        return _gemm(a, b)

    def backward(self, grad):
        a, b = self.saved
        xp = backend.array_module(grad)
        grad_a = grad_b = None
        if b is not None:
            grad_a = unbroadcast(_gemm(grad, xp.swapaxes(b, -1, -2)), self.shapes[0])
        if a is not None:
            if len(self.shapes[1]) == 2:
                # dW = A^T dC summed over every leading dimension: (k, s*b) @ (s*b, n)
                grad_b = a.reshape(-1, a.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
            else:
                grad_b = unbroadcast(xp.swapaxes(a, -1, -2) @ grad, self.shapes[1])
        return grad_a, grad_b


def _gemm(a, b):
    """``a @ b``, folding the leading dimensions of ``a`` into one GEMM when ``b`` is a matrix."""
    if b.ndim == 2 and a.ndim > 2:
        return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])
    return a @ b


def matmul(a, b):
    return MatMul.apply(*_operands(a, b))


# -- small helpers shared by the ops below ----------------------------------------------------------

def _axes(axis, ndim):
    """``axis`` (None, an int or a tuple, negatives allowed) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if not isinstance(axis, (tuple, list)):
        axis = (axis,)  # an int, or a numpy integer
    axes = tuple(sorted(a % ndim if ndim else a for a in axis))
    if len(set(axes)) != len(axes) or any(not 0 <= a < _python_max(ndim, 1) for a in axes):
        raise ValueError(f"bad axis {axis} for an array of {ndim} dimensions")
    return axes


def _kept_shape(shape, axes):
    """``shape`` with the reduced ``axes`` kept as size 1: the shape of a ``keepdims=True`` result."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _raw(value):
    """The array inside a Tensor; anything else unchanged (ids, targets and indices are not
    differentiable, so ops take them as plain arrays)."""
    return value.data if isinstance(value, Tensor) else value


# -- elementwise ----------------------------------------------------------------------------------

class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, grad):
        return -grad


class Pow(Function):
    """``x ** exponent`` for a constant exponent. Backward: d(x^n)/dx = n x^(n-1)."""

    def forward(self, x, exponent):
        self.exponent = exponent
        self.save_for_backward(x)
        return x ** exponent

    def backward(self, grad):
        (x,) = self.saved
        return grad * self.exponent * x ** (self.exponent - 1)


class Exp(Function):
    """Backward: d(e^x)/dx = e^x, the output itself, so the output is what is saved."""

    def forward(self, x):
        y = backend.array_module(x).exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        return grad * y


class Log(Function):
    """Backward: d(log x)/dx = 1/x."""

    def forward(self, x):
        self.save_for_backward(x)
        return backend.array_module(x).log(x)

    def backward(self, grad):
        (x,) = self.saved
        return grad / x


class Tanh(Function):
    """Backward: d(tanh x)/dx = 1 - tanh(x)^2, read from the saved output."""

    def forward(self, x):
        y = backend.array_module(x).tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        return grad * (1 - y * y)


def neg(x):
    return Neg.apply(x)


def pow(x, exponent):
    """``x ** exponent``; ``exponent`` is a Python number (a constant, not differentiated)."""
    if isinstance(exponent, Tensor):
        raise TypeError("pow takes a Python number as the exponent, not a Tensor")
    return Pow.apply(x, exponent=exponent)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def tanh(x):
    return Tanh.apply(x)


# -- reductions -----------------------------------------------------------------------------------

class Sum(Function):
    """Backward: every input entry added into an output entry with weight 1, so each receives that
    output's gradient: the gradient is broadcast back over the reduced axes (a view, no copy)."""

    def forward(self, x, axis=None, keepdims=False):
        self.shape = x.shape
        self.axes = _axes(axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, grad):
        xp = backend.array_module(grad)
        return xp.broadcast_to(grad.reshape(_kept_shape(self.shape, self.axes)), self.shape)


class Mean(Function):
    """Backward: like ``Sum``, each input entry receiving its output's gradient divided by the number
    of entries averaged."""

    def forward(self, x, axis=None, keepdims=False):
        self.shape = x.shape
        self.axes = _axes(axis, x.ndim)
        self.count = 1
        for a in self.axes:
            self.count *= x.shape[a]
        return x.mean(axis=self.axes, keepdims=keepdims)

    def backward(self, grad):
        xp = backend.array_module(grad)
        return xp.broadcast_to(grad.reshape(_kept_shape(self.shape, self.axes)) / self.count, self.shape)


class Max(Function):
    """The largest entry along ``axis``.

    Backward: max is locally the identity on the entry that attains it and constant in the others, so
    the gradient goes to the argmax. Where several entries tie, max is not differentiable; we split the
    gradient evenly among them (the average of the one-sided choices), so the total is conserved.
    Saves a bool mask of the winners (1 byte per input entry) and the count per output entry.
    """

    def forward(self, x, axis=None, keepdims=False):
        self.axes = _axes(axis, x.ndim)
        kept = x.max(axis=self.axes, keepdims=True)
        if self.needs_input_grad[0]:
            winners = x == kept
            self.save_for_backward(winners, winners.sum(axis=self.axes, keepdims=True))
        return kept if keepdims else kept.reshape(tuple(n for i, n in enumerate(x.shape) if i not in self.axes))

    def backward(self, grad):
        winners, ties = self.saved
        return winners * (grad.reshape(ties.shape) / ties).astype(grad.dtype, copy=False)


def sum(x, axis=None, keepdims=False):
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):
    return Max.apply(x, axis=axis, keepdims=keepdims)


# -- views and shape changes ----------------------------------------------------------------------

class Reshape(Function):
    """A view when the memory layout allows (as numpy's reshape); backward reshapes the gradient back."""

    def forward(self, x, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, grad):
        return grad.reshape(self.shape)


class Transpose(Function):
    """Permute the axes (a view). Backward applies the inverse permutation: output axis i is input
    axis ``axes[i]``, so the gradient's axis ``axes[i]`` must come back to position ``axes[i]``."""

    def forward(self, x, axes=None):
        axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
        self.inverse = tuple(sorted(range(x.ndim), key=axes.__getitem__))
        return x.transpose(axes)

    def backward(self, grad):
        return grad.transpose(self.inverse)


def _is_basic_index(index):
    """True for indices made only of ints, slices, None and Ellipsis: numpy returns a view for them,
    and each input entry appears at most once in the output."""
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice, numpy.integer)) for i in index)


class GetItem(Function):
    """``x[index]``: basic slicing (a view), ints, None, Ellipsis, and integer-array indexing (a copy).

    Backward scatters the gradient into zeros of x's shape: an entry picked k times receives the sum
    of its k gradients. Basic indices pick each entry at most once, so a slice assignment does it;
    integer arrays may repeat entries, so ``xp.add.at`` (an unbuffered add) is needed there.
    """

    def forward(self, x, index):
        self.shape, self.index, self.basic = x.shape, index, _is_basic_index(index)
        return x[index]

    def backward(self, grad):
        xp = backend.array_module(grad)
        grad_x = xp.zeros(self.shape, dtype=grad.dtype)
        if self.basic:
            grad_x[self.index] = grad
        else:
            xp.add.at(grad_x, self.index, grad)
        return grad_x


def reshape(x, shape):
    """``x`` with a new ``shape`` (one entry may be -1); a view when numpy's reshape gives one."""
    if isinstance(shape, int):
        shape = (shape,)
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x, axes=None):
    """Permute the axes of ``x``; ``axes=None`` reverses them (a view)."""
    return Transpose.apply(x, axes=None if axes is None else tuple(axes))


def getitem(x, index):
    """``x[index]`` (see ``GetItem``). Tensors and lists inside ``index`` are taken as integer arrays."""
    if not isinstance(index, tuple):
        index = (index,)
    xp = backend.array_module(x.data)
    index = tuple(xp.asarray(_raw(i)) if isinstance(i, (Tensor, list, numpy.ndarray)) else i for i in index)
    return GetItem.apply(x, index=index)


def split(x, sections, axis=0):
    """Cut ``x`` along ``axis`` into pieces, each a ``getitem`` view.

    ``sections`` is the number of equal pieces (it must divide the axis, as in ``numpy.split``) or a
    list of piece sizes that add up to the axis length (as in ``torch.split`` with a list).
    """
    axis = axis % x.ndim
    length = x.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or length % sections:
            raise ValueError(f"cannot split an axis of {length} into {sections} equal sections")
        sizes = [length // sections] * sections
    else:
        sizes = [int(n) for n in sections]
        if _python_sum(sizes) != length or any(n < 0 for n in sizes):
            raise ValueError(f"section sizes {sizes} do not add up to the axis length {length}")
    pieces, start = [], 0
    for size in sizes:
        pieces.append(getitem(x, (slice(None),) * axis + (slice(start, start + size),)))
        start += size
    return pieces


class Cat(Function):
    """Join along an existing axis. Backward: each input gets its own slab of the gradient (views)."""

    def forward(self, *arrays, axis=0):
        xp = backend.array_module(arrays[0])
        self.axis = axis % arrays[0].ndim
        self.sizes = [a.shape[self.axis] for a in arrays]
        return xp.concatenate(arrays, axis=self.axis)

    def backward(self, grad):
        grads, start = [], 0
        for size, needed in zip(self.sizes, self.needs_input_grad):
            grads.append(grad[(slice(None),) * self.axis + (slice(start, start + size),)] if needed else None)
            start += size
        return tuple(grads)


class Stack(Function):
    """Join along a new axis. Backward: input i gets the gradient's slice i along that axis (a view)."""

    def forward(self, *arrays, axis=0):
        xp = backend.array_module(arrays[0])
        self.axis = axis % (arrays[0].ndim + 1)
        return xp.stack(arrays, axis=self.axis)

    def backward(self, grad):
        return tuple(grad[(slice(None),) * self.axis + (i,)] if needed else None
                     for i, needed in enumerate(self.needs_input_grad))


def cat(tensors, axis=0):
    return Cat.apply(*tensors, axis=axis)


def stack(tensors, axis=0):
    return Stack.apply(*tensors, axis=axis)


# -- activations ----------------------------------------------------------------------------------

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


# -- layer norm -----------------------------------------------------------------------------------

class LayerNorm(Function):
    """y = x_hat * weight + bias, x_hat = (x - mean) / sqrt(var + eps), over the last axis (hidden).

    One fused op with a closed-form backward rather than a chain of small ops, which would save
    several input-sized intermediates. It saves x_hat (input-sized: the paper's 2sbh per LayerNorm) and
    the per-row 1/std (and the weight, a parameter), nothing else.

    Backward, per row of h entries, with d = g * weight (the gradient reaching x_hat):
        dx = (1/std) * (d - mean(d) - x_hat * mean(d * x_hat))
    (mean(d) comes through the mean, mean(d * x_hat) through the variance), and
        dweight = sum over rows of g * x_hat,    dbias = sum over rows of g.
    Rows are independent (each token normalises alone), which is why sequence parallelism can shard
    LayerNorm along s with no communication in forward; only dweight and dbias need summing over ranks.
    """

    def forward(self, x, weight, bias, eps=1e-5):
        xp = backend.array_module(x)
        mean_ = x.mean(axis=-1, keepdims=True)
        centred = x - mean_
        rstd = 1 / xp.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
        x_hat = centred
        x_hat *= rstd  # in place: centred is not needed again
        self.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight + bias

    def backward(self, grad):
        x_hat, rstd, weight = self.saved
        hidden = x_hat.shape[-1]
        grad_x = grad_weight = grad_bias = None
        if self.needs_input_grad[0]:
            d = grad * weight
            grad_x = rstd * (d - d.mean(axis=-1, keepdims=True)
                             - x_hat * (d * x_hat).mean(axis=-1, keepdims=True))
        rows = grad.reshape(-1, hidden)
        if self.needs_input_grad[1]:
            grad_weight = (rows * x_hat.reshape(-1, hidden)).sum(axis=0)
        if self.needs_input_grad[2]:
            grad_bias = rows.sum(axis=0)
        return grad_x, grad_weight, grad_bias


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis; ``weight`` and ``bias`` have shape (h,)."""
    return LayerNorm.apply(x, weight, bias, eps=eps)


# -- dropout --------------------------------------------------------------------------------------

class Dropout(Function):
    """y = x * mask / (1 - p), the mask a pure function of (seed, counter, global element index).

    The mask comes from ``minitp.rng.keep_mask``: a rank holding a block of the global tensor (a
    sequence shard under SP, a head shard of attention's (b, a, s, s) probabilities under TP) draws
    exactly its block of the serial mask, so sharded and serial runs drop the same elements.

    Backward: dx = g * mask / (1 - p). Saves only the bool mask, 1 byte per element: the paper's
    activation-memory count charges dropout masks at 1 byte (sbh per dropout, as^2b in attention).
    """

    def forward(self, x, p, seed, counter, global_shape=None, offset=None, training=True):
        self.scale = 1 / (1 - p)
        if p == 0 or not training:
            return x  # the identity: no mask drawn, nothing saved
        mask = rng.keep_mask(x.shape, p, seed, counter, global_shape, offset, backend.array_module(x))
        self.save_for_backward(mask)
        return x * mask * self.scale

    def backward(self, grad):
        if not self.saved:
            return grad
        (mask,) = self.saved
        return grad * mask * self.scale


def dropout(x, p, seed, counter, global_shape=None, offset=None, training=True):
    """Zero each entry of ``x`` with probability ``p`` and scale the rest by 1/(1-p).

    ``x`` may be a block of a larger global tensor of ``global_shape`` starting at ``offset`` (one start
    per axis); by default it is the whole tensor. ``p = 0`` or ``training=False`` is the identity.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
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
    """

    def forward(self, scores):
        if scores.ndim < 2:
            raise ValueError(f"causal_mask takes scores (..., s_q, s_k), got shape {scores.shape}")
        xp = backend.array_module(scores)
        self.shape = scores.shape
        future = _future_keys(scores.shape[-2], scores.shape[-1], xp)
        return xp.where(future, xp.asarray(-numpy.inf, dtype=scores.dtype), scores)

    def backward(self, grad):
        xp = backend.array_module(grad)
        future = _future_keys(self.shape[-2], self.shape[-1], xp)
        return xp.where(future, xp.zeros((), dtype=grad.dtype), grad)


def causal_mask(scores):
    return CausalMask.apply(scores)


# -- embedding and the loss -------------------------------------------------------------------------

class Embedding(Function):
    """out[..., :] = weight[ids[...], :]: (*ids.shape,) ids and a (vocab, h) table give (*ids.shape, h).

    Backward: row v of dweight is the sum of the output gradients at every position whose id is v (a
    scatter-add, since an id may repeat). Saves only the ids.
    """

    def forward(self, weight, ids):
        xp = backend.array_module(weight)
        self.save_for_backward(ids)
        self.weight_shape = weight.shape
        return xp.take(weight, ids, axis=0)

    def backward(self, grad):
        (ids,) = self.saved
        xp = backend.array_module(grad)
        hidden = self.weight_shape[-1]
        grad_weight = xp.zeros(self.weight_shape, dtype=grad.dtype)
        xp.add.at(grad_weight, ids.reshape(-1), grad.reshape(-1, hidden))
        return grad_weight


def check_indices(indices, count, what, size_name):
    """``ValueError`` unless every entry of ``indices`` is in [0, count).

    Checked here because numpy will not: a negative index counts from the end (id -1 silently reads
    the last row), and an index past the end raises an IndexError that names neither the op nor the
    vocabulary. On a GPU, min and max cost one small device-to-host copy each."""
    if indices.size == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= count:
        raise ValueError(f"{what} range over [{low}, {high}], not within [0, {count - 1}] ({size_name} {count})")


def embedding(ids, weight):
    """Look up rows of ``weight`` (vocab, h) for integer ``ids`` of any shape: (*ids.shape, h)."""
    ids = backend.array_module(weight.data).asarray(_raw(ids))
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got {ids.dtype}")
    check_indices(ids, weight.shape[0], "embedding ids", "vocabulary size")
    return Embedding.apply(weight, ids=ids)


class CrossEntropy(Function):
    """loss = -log softmax(logits)[target] = logsumexp(logits) - logits[target], per position.

    logits (..., v) and integer targets (...); reduced by "mean" (over positions), "sum" or "none".
    logsumexp is computed as m + log sum exp(logits - m), m the row max, so nothing overflows.

    Backward: d loss / d logits = softmax(logits) - onehot(target), times the incoming gradient (and
    1/N for the mean). Saves the softmax (logits-sized) and the targets.
    """

    def forward(self, logits, targets, reduction="mean"):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets of shape {targets.shape} for logits of shape {logits.shape}")
        xp = backend.array_module(logits)
        self.reduction = reduction
        shifted = logits - logits.max(axis=-1, keepdims=True)
        exps = xp.exp(shifted)
        sum_exps = exps.sum(axis=-1, keepdims=True)
        target_logit = xp.take_along_axis(shifted, targets[..., None], axis=-1)
        losses = (xp.log(sum_exps) - target_logit)[..., 0]
        if self.needs_input_grad[0]:
            exps /= sum_exps  # now the softmax
            self.save_for_backward(exps, targets)
        return reduce_loss(losses, reduction)

    def backward(self, grad):
        probs, targets = self.saved
        xp = backend.array_module(probs)
        vocab = probs.shape[-1]
        # softmax - onehot, written into the saved softmax: the graph is walked once and the engine
        # drops saved arrays after backward, so this saves a logits-sized allocation.
        grad_logits = probs.reshape(-1, vocab)
        grad_logits[xp.arange(grad_logits.shape[0]), targets.reshape(-1)] -= 1
        return reduce_loss_backward(grad_logits.reshape(probs.shape), grad, self.reduction)


def reduce_loss(losses, reduction):
    """Per-token ``losses`` (...) -> their "mean", their "sum", or themselves ("none")."""
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def reduce_loss_backward(grad_logits, grad, reduction):
    """The backward of ``reduce_loss`` applied to per-token logit gradients (..., v): each token's row
    times its own upstream gradient ("none"), the one upstream gradient ("sum"), or that over the
    number of tokens ("mean")."""
    if reduction == "none":
        return grad_logits * grad[..., None]
    tokens = grad_logits.size // grad_logits.shape[-1]
    return grad_logits * (grad / tokens if reduction == "mean" else grad)


def cross_entropy(logits, targets, reduction="mean"):
    """Softmax cross-entropy of ``logits`` (..., v) against integer ``targets`` (...)."""
    targets = backend.array_module(logits.data).asarray(_raw(targets))
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy targets must be integers, got {targets.dtype}")
    check_indices(targets, logits.shape[-1], "cross_entropy targets", "classes in the logits:")
    return CrossEntropy.apply(logits, targets=targets, reduction=reduction)
