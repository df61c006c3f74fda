"""What is the gradient of an elementwise op: + - * / and negation (broadcast like numpy), a constant
power, exp, log and tanh?

Each backward needs at most one saved array (an operand or the output); binary ops sum their gradient
back to each operand's shape with ``unbroadcast``.
"""
from minitp import backend
from minitp.autograd import Function, Tensor
from minitp.functional.operands import tensor_pair, unbroadcast


# -- two operands, broadcast ----------------------------------------------------------------------

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
    return Add.apply(*tensor_pair(a, b))


def sub(a, b):
    return Sub.apply(*tensor_pair(a, b))


def mul(a, b):
    return Mul.apply(*tensor_pair(a, b))


def div(a, b):
    return Div.apply(*tensor_pair(a, b))


# -- one operand ----------------------------------------------------------------------------------

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

