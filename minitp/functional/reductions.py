"""What are the gradients of sum, mean and max over some axes, and how are the axes read?"""
import builtins

from minitp import backend
from minitp.autograd import Function
from minitp.functional import precision

# This module defines differentiable sum and max; the axis check below needs Python's own max.
_python_max = builtins.max


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


class Sum(Function):
    """Backward: every input entry added into an output entry with weight 1, so each receives that
    output's gradient: the gradient is broadcast back over the reduced axes (a view, no copy)."""

    def forward(self, x, axis=None, keepdims=False):
        self.shape = x.shape
        self.axes = _axes(axis, x.ndim)
        return precision.total(x, axis=self.axes, keepdims=keepdims)

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
        return precision.average(x, axis=self.axes, keepdims=keepdims)

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

