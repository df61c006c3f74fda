"""Every differentiable op, each a ``Function`` with its forward and backward side by side.

Ops take Tensors (Python numbers are accepted where a tensor operand makes sense) and return Tensors.
Inside ``forward``/``backward`` everything is a raw array and ``xp`` is the array's own module (numpy or
CuPy), so one code path serves both backends. Shapes in comments follow the paper: s sequence,
b batch, h hidden, a heads, d = h/a head size.
"""
from minitp import backend
from minitp.autograd import Function, Tensor


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
