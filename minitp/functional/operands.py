"""How does an op take its arguments, and how does a gradient get back to an operand's shape?

A Python number beside a Tensor becomes a constant Tensor of the Tensor's dtype; ids, targets and indices
(never differentiated) are taken as plain arrays; and ``unbroadcast`` is the backward of numpy
broadcasting, shared by every op that broadcasts its operands.
"""
from minitp import backend
from minitp.autograd import Tensor
from minitp.functional.precision import total


def constant_like(value, like):
    """A constant operand as a Tensor of ``like``'s dtype (so 2 * x stays float32 for float32 x)."""
    if isinstance(value, Tensor):
        return value
    return Tensor(backend.array_module(like.data).asarray(value, dtype=like.dtype))


def tensor_pair(a, b):
    """Both operands of a binary op as Tensors, a Python number taking the other operand's dtype."""
    if not isinstance(a, Tensor):
        a = constant_like(a, b)
    if not isinstance(b, Tensor):
        b = constant_like(b, a)
    return a, b


def raw_array(value):
    """The array inside a Tensor; anything else unchanged (ids, targets and indices are not
    differentiable, so ops take them as plain arrays)."""
    return value.data if isinstance(value, Tensor) else value


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of numpy broadcasting.

    A dimension that broadcasting added (leading) or stretched (size 1) received the same input value
    at every position, so its gradient is the sum over those positions.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return total(grad, axis=axes, keepdims=True).reshape(shape) if axes else grad.reshape(shape)
