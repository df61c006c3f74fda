"""What are the forward and backward of ``a @ b``, and how is a weight product made one large GEMM (with
its bias added in place)?"""
from minitp import backend
from minitp.autograd import Function
from minitp.functional.operands import tensor_pair, unbroadcast
from minitp.functional.precision import compute_dtype, product


class MatMul(Function):
    """``a @ b`` for operands of two or more dimensions, batched and broadcast as in numpy.

    Backward of C = A B: dA = dC B^T and dB = A^T dC, each summed over broadcast batch dimensions.
    Each of the three products follows ``precision.product``'s rule for 2-byte floats (in backward the
    gradient is widened to fp32 once for both products, each product rounded once).
    A weight shared by every batch entry, (s, b, h) @ (h, n), is one GEMM of (s*b, h) @ (h, n), not
    s GEMMs of (b, h) @ (h, n): BLAS is fastest on one large product.
    """

    def forward(self, a, b):
        self._save(a, b)
        return _gemm(a, b)

    def _save(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul takes operands of 2 or more dimensions, got {a.shape} @ {b.shape}")
        self.save_for_backward(a if self.needs_input_grad[1] else None,
                               b if self.needs_input_grad[0] else None)
        self.shapes = a.shape, b.shape

    def backward(self, grad):
        a, b = self.saved
        xp = backend.array_module(grad)
        grad_a = grad_b = None
        dtype, wide = grad.dtype, compute_dtype(grad)
        if wide != dtype and all(v is None or v.dtype == dtype for v in (a, b)):
            # 2-byte floats on numpy: precision.product's rule, with the gradient widened once for both
            # products (each operand widened, the fp32 product rounded once -- the same bits)
            grad = grad.astype(wide)
            rounded, a, b = (lambda y: y.astype(dtype)), _widened(a, wide), _widened(b, wide)
        else:
            rounded = _as_it_is
        if b is not None:
            grad_a = unbroadcast(rounded(_gemm(grad, xp.swapaxes(b, -1, -2))), self.shapes[0])
            b = None  # the widened copy, if any, freed before a's is made
        if a is not None:
            if len(self.shapes[1]) == 2:
                # dW = A^T dC summed over every leading dimension: (k, s*b) @ (s*b, n)
                grad_b = rounded(product(a.reshape(-1, a.shape[-1]).T, grad.reshape(-1, grad.shape[-1])))
            else:
                grad_b = unbroadcast(rounded(product(xp.swapaxes(a, -1, -2), grad)), self.shapes[1])
        return grad_a, grad_b


class Linear(MatMul):
    """``x @ weight + bias`` as one op: the bias is added in place into the GEMM's fresh output (torch's
    addmm), where a separate ``Add`` would write a second output-sized array, one more pass over memory.

    Saves what ``MatMul`` saves (x and the weight); the bias needs nothing: its gradient is dy summed
    over every leading (s, b) position, the backward of its broadcast.

    2-byte floats on numpy: the bias is added to the fp32 product before its one rounding (addmm's
    epilogue on a GPU; ``precision.compute_dtype``), y = round(x @ weight + bias) computed in fp32.
    """

    def forward(self, x, weight, bias):
        if bias.ndim != 1 or bias.shape[0] != weight.shape[-1]:
            raise ValueError(f"linear takes a bias of shape ({weight.shape[-1]},), got {bias.shape}")
        self.bias_shape = bias.shape
        wide = compute_dtype(x)
        if wide == x.dtype or not x.dtype == weight.dtype == bias.dtype:
            y = super().forward(x, weight)  # float32/float64, CuPy: as it is
            y += bias
            return y
        self._save(x, weight)
        y = _gemm(x.astype(wide), weight.astype(wide))
        y += bias.astype(wide)
        return y.astype(x.dtype)

    def backward(self, grad):
        grad_x, grad_weight = super().backward(grad)
        return grad_x, grad_weight, unbroadcast(grad, self.bias_shape) if self.needs_input_grad[2] else None


def _widened(array, dtype):
    return None if array is None else array.astype(dtype)


def _as_it_is(array):
    return array


def _gemm(a, b):
    """``a @ b``, folding the leading dimensions of ``a`` into one GEMM when ``b`` is a matrix. 2-byte
    floats accumulate in fp32 and are rounded once (``precision.product``)."""
    if b.ndim == 2 and a.ndim > 2:
        return product(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
    return product(a, b)


def matmul(a, b):
    return MatMul.apply(*tensor_pair(a, b))


def linear(x, weight, bias=None):
    """``x @ weight + bias`` with ``weight`` (in, out) and ``bias`` (out,) or None: one op (``Linear``)."""
    return MatMul.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)
