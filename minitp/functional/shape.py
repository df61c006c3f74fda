"""How do views and shape changes (reshape, transpose, indexing, split, cat, stack) route the gradient
back to their input?

None of them computes anything: backward only puts each gradient entry back where its input entry was.
"""
import numpy

from minitp import backend
from minitp.autograd import Function, Tensor
from minitp.functional.operands import raw_array


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

    fresh_gradients = True  # backward's zeros are its own

    def forward(self, x, index):
        self.shape, self.index, self.basic = x.shape, index, _is_basic_index(index)
        return x[index]

    def backward(self, grad):
        xp = backend.array_module(grad)
        grad_x = xp.zeros(self.shape, dtype=grad.dtype)
        if self.basic:
            grad_x[self.index] = grad  # into zeros: a write, not an addition
        else:
            xp.add.at(grad_x, self.index, grad)
        return grad_x

    def backward_into(self, grad, total):
        """Add the gradient into ``total`` (x's shape) at the picked entries only: the engine calls this
        when x's pending gradient is its own array, e.g. for the second and third of q, k and v."""
        if self.basic:
            total[self.index] += grad
        else:
            backend.array_module(grad).add.at(total, self.index, grad)


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
    index = tuple(xp.asarray(raw_array(i)) if isinstance(i, (Tensor, list, numpy.ndarray)) else i for i in index)
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
        if sum(sizes) != length or any(n < 0 for n in sizes):
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

