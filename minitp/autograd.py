"""Reverse-mode automatic differentiation over raw numpy/CuPy arrays.

Two classes hold the whole idea:

- ``Tensor`` wraps an array (``.data``), says whether it ``requires_grad``, and remembers the
  ``Function`` that produced it.
- ``Function`` is one differentiable op: ``forward`` maps input arrays to an output array and stores what
  backward will need (``save_for_backward``); ``backward`` maps the gradient of the output to the
  gradients of the inputs. The two sit side by side in each op, as in micrograd and Chainer.

``Tensor.backward()`` walks the graph in reverse topological order, summing the gradients that reach a
tensor along several paths (the chain rule's sum over paths). Leaves that require grad accumulate into
``.grad``. The engine writes in place only into a sum it made itself, or a gradient an op declares new
(``fresh_gradients``) -- arrays nothing else holds -- so one gradient array may be shared safely between
ops. An op that reaches a small part of its input (``getitem``: q, k and v are thirds of one qkv
product) may add its share into such a sum directly (``backward_into``), instead of building an
input-sized array of zeros around it.

A leaf's gradient is put into ``.grad`` as soon as the last op that feeds it a gradient has run, not
when the walk reaches the leaf (which, in a reversed depth-first order, is at the very end for every
parameter); hooks registered with ``register_post_accumulate_grad_hook`` run then. Data parallelism
starts reducing a bucket of gradients from such a hook, while backward goes on below it.

While a ``track_saved`` block is open, ``Function.apply`` hands each op it records to
``minitp.saved_bytes``, which counts the bytes kept for backward; ``track_saved`` is re-exported here.
While a trace is recorded (``minitp.trace``), every op's forward and backward is one "compute" span.
"""
import contextlib

from minitp import backend
from minitp import trace as _trace
from minitp.saved_bytes import open_trackers as _saved_trackers, record as _record_saved
from minitp.saved_bytes import SavedBytes, track_saved  # noqa: F401 (still importable from here)

_grad_enabled = True
_saved_hooks = []  # (pack, unpack) pairs pushed by push_saved_hooks: the innermost packs what ops save
_functional = None  # minitp.functional, once an operator (+, @, ...) first needs it


@contextlib.contextmanager
def no_grad():
    """Run ops without recording a graph: nothing is saved for backward, outputs need no grad."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


@contextlib.contextmanager
def enable_grad():
    """Record a graph again inside a ``no_grad`` block. Activation recomputation needs it: a region
    re-run during backward must record its ops even if backward itself was called under ``no_grad``."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


def push_saved_hooks(pack, unpack):
    """From now on, every op recorded keeps ``pack(array)`` for each array it saves, and its backward
    reads ``unpack(packed)`` (torch's ``saved_tensors_hooks``); ``pop_saved_hooks()`` ends it.

    ZeRO-3 needs it: a gathered parameter must be freed after its unit's forward, but an op that saved
    it (a GEMM keeps its weight for dX) would keep the whole array alive. numpy cannot shrink an array
    under its holders (FSDP frees with ``storage.resize_(0)``), so the graph keeps a name instead and
    backward reads the array gathered again."""
    _saved_hooks.append((pack, unpack))


def pop_saved_hooks():
    _saved_hooks.pop()


class Tensor:
    """An array plus what backward needs: ``requires_grad``, ``.grad`` and the producing ``Function``.

    ``.data`` is a plain numpy or CuPy array and ``.grad`` (after ``backward``) is an array of the same
    shape. Arithmetic operators (``+ - * / ** @``, ``[]``) build differentiable ops from
    ``minitp.functional``.
    """

    is_parameter = False  # minitp.nn.Parameter says True: weights are not activations (see track_saved)
    _post_accumulate_grad_hooks = ()  # a leaf's own list once a hook is registered
    __array_priority__ = 1000  # numpy array <op> Tensor defers to Tensor's reflected operator

    def __init__(self, data, requires_grad=False, name=None):
        if isinstance(data, Tensor):
            data = data.data
        if type(data).__name__ != "ndarray":  # a list, a Python or numpy scalar: make it an array
            data = backend.xp.asarray(data)
        self.data = data
        self.requires_grad = requires_grad
        self.grad = None
        self.name = name
        self._fn = None  # the Function that made this tensor; None for a leaf

    # -- what the array is -------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def numpy(self):
        """The values as a numpy array on the host."""
        return backend.to_host(self.data)

    def item(self):
        return self.data.item()

    def detach(self):
        """The same array, cut from the graph."""
        return Tensor(self.data)

    def register_post_accumulate_grad_hook(self, hook):
        """Call ``hook(self)`` whenever a backward has put this leaf's whole gradient of that backward
        into ``.grad`` (torch's hook of the same name). Returns a handle: ``handle.remove()``."""
        if self._fn is not None:
            raise RuntimeError("register_post_accumulate_grad_hook: only a leaf (a parameter) has a .grad")
        if not self._post_accumulate_grad_hooks:
            self._post_accumulate_grad_hooks = []
        self._post_accumulate_grad_hooks.append(hook)
        return _HookHandle(self._post_accumulate_grad_hooks, hook)

    # -- the graph walk ----------------------------------------------------------------------------
    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is the gradient arriving from above; it defaults to 1 for a scalar. The saved arrays
        are released as each op is passed, so a graph can be walked once. A leaf's ``.grad`` is written
        as soon as every op that owes it a gradient has run (then its hooks run).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() needs an explicit grad for a tensor of shape {self.shape}")
            grad = backend.array_module(self.data).ones_like(self.data)
        elif isinstance(grad, Tensor):
            grad = grad.data
        if grad.shape != self.shape:
            raise ValueError(f"grad of shape {grad.shape} for a tensor of shape {self.shape}")

        grads = {id(self): grad}
        owned = set()  # tensors whose pending gradient is an array this walk made and alone holds
        order, owed = _topological_order(self)
        for tensor in reversed(order):
            grad = grads.pop(id(tensor), None)
            if grad is None:
                continue  # no path from self reaches here with a gradient (or a leaf already done)
            fn = tensor._fn
            if fn is None:
                _accumulate(tensor, grad)
                continue
            if fn.unpack is not None:  # its saved arrays were packed (push_saved_hooks): read them back
                fn.saved = tuple(fn.unpack(array) for array in fn.saved)
            started = None if _trace.recording is None else _trace.now()
            total = _owned_total(fn, grad, grads, owned)
            if total is not None:
                fn.backward_into(grad, total)  # its share added into the input's pending sum
                input_grads = (None,)
            else:
                input_grads = fn.backward(grad)
            if started is not None:
                _trace.complete(f"{type(fn).__name__} backward", "compute", started)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for parent, parent_grad in zip(fn.inputs, input_grads):
                if not parent.requires_grad:
                    continue
                if parent_grad is not None:
                    _add_gradient(grads, owned, id(parent), parent_grad, fn.fresh_gradients)
                if parent._fn is None:  # a leaf: was this the last op that owed it a gradient?
                    owed[id(parent)] -= 1
                    if owed[id(parent)] == 0 and id(parent) in grads:
                        _accumulate(parent, grads.pop(id(parent)))
            fn.saved = ()
            tensor._fn = None  # the graph above this tensor is spent

    # -- operators: thin wrappers over minitp.functional -------------------------------------------
    def _f(self):
        # functional imports this module, so it is imported on first use, then kept: an import
        # statement per operator costs more than the op itself on small tensors
        global _functional
        if _functional is None:
            from minitp import functional as _functional
        return _functional

    def __add__(self, other): return self._f().add(self, other)
    def __radd__(self, other): return self._f().add(other, self)
    def __sub__(self, other): return self._f().sub(self, other)
    def __rsub__(self, other): return self._f().sub(other, self)
    def __mul__(self, other): return self._f().mul(self, other)
    def __rmul__(self, other): return self._f().mul(other, self)
    def __truediv__(self, other): return self._f().div(self, other)
    def __rtruediv__(self, other): return self._f().div(other, self)
    def __neg__(self): return self._f().neg(self)
    def __pow__(self, exponent): return self._f().pow(self, exponent)
    def __matmul__(self, other): return self._f().matmul(self, other)
    def __rmatmul__(self, other): return self._f().matmul(other, self)
    def __getitem__(self, index): return self._f().getitem(self, index)

    def sum(self, axis=None, keepdims=False): return self._f().sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return self._f().mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return self._f().max(self, axis, keepdims)
    def reshape(self, *shape): return self._f().reshape(self, shape[0] if len(shape) == 1 else shape)
    def transpose(self, *axes): return self._f().transpose(self, axes[0] if len(axes) == 1 else (axes or None))
    def exp(self): return self._f().exp(self)
    def log(self): return self._f().log(self)
    def tanh(self): return self._f().tanh(self)

    @property
    def T(self):
        return self._f().transpose(self)


class _HookHandle:
    def __init__(self, hooks, hook):
        self.hooks, self.hook = hooks, hook

    def remove(self):
        if self.hook in self.hooks:
            self.hooks.remove(self.hook)


def _owned_total(fn, grad, grads, owned):
    """The pending gradient of ``fn``'s input when ``fn`` can add its share into it (``backward_into``)
    and the engine alone holds it (``owned``), with ``grad``'s dtype; else None."""
    if fn.backward_into is None or id(fn.inputs[0]) not in owned:
        return None
    total = grads.get(id(fn.inputs[0]))
    return total if total is not None and total.dtype == grad.dtype else None


def _add_gradient(grads, owned, key, grad, fresh):
    """Add ``grad`` to the pending gradient ``grads[key]``: the first one is kept as it is (``owned`` if
    ``fresh``); a later one is added in place into an owned array, else summed into a new array, which
    is then owned. Only n-d arrays are owned: numpy returns a 0-d sum as a scalar, not an array."""
    previous = grads.get(key)
    if previous is None:
        grads[key] = grad
        if fresh and getattr(grad, "ndim", 0):
            owned.add(key)
    elif key in owned and previous.shape == grad.shape and previous.dtype == grad.dtype:
        previous += grad
    else:
        grads[key] = total = previous + grad
        if getattr(total, "ndim", 0):
            owned.add(key)


def _accumulate(leaf, grad):
    """Add ``grad`` (the leaf's whole gradient from this backward) into ``leaf.grad``; run its hooks."""
    leaf.grad = grad if leaf.grad is None else leaf.grad + grad
    for hook in leaf._post_accumulate_grad_hooks:
        hook(leaf)


def _topological_order(root):
    """Every tensor that ``root`` depends on through recorded ops, each after its inputs; and for each
    leaf that requires grad, how many op inputs it is (how many gradients it is owed).

    Iterative (no recursion limit for deep graphs such as a 48-layer model)."""
    order, visited, stack, owed = [], set(), [(root, False)], {}
    while stack:
        tensor, inputs_done = stack.pop()
        if inputs_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor._fn is not None:
            for parent in tensor._fn.inputs:
                if parent._fn is None and parent.requires_grad:
                    owed[id(parent)] = owed.get(id(parent), 0) + 1
                if id(parent) not in visited:
                    stack.append((parent, False))
    return order, owed


class Function:
    """One differentiable op. Subclasses write ``forward`` and ``backward`` on raw arrays.

    ``forward(self, *arrays, **options)`` returns the output array and calls ``save_for_backward`` with
    what ``backward`` will read. ``backward(self, grad_output)`` returns one gradient per positional input
    (a tuple, or a single array for one input); ``None`` where no gradient flows.
    ``self.needs_input_grad[i]`` lets backward skip work for inputs that do not require grad.

    Use ``MyOp.apply(*tensors, **options)``: positional arguments are Tensors (differentiable inputs),
    keyword arguments are plain options (axis, probability, communicator, ...).
    """

    saved = ()
    unpack = None  # set when push_saved_hooks packed what this op saved
    fresh_gradients = False
    """True when ``backward`` always returns new arrays that no one else holds (the engine may add later
    gradients into them in place)."""
    backward_into = None
    """Optional, for an op of one input: ``backward_into(grad_output, total)`` adds this op's gradient into
    ``total``, the input's pending gradient (its shape and dtype), an array the engine made and holds alone."""

    def forward(self, *arrays, **options):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def save_for_backward(self, *arrays):
        self.saved = arrays

    @classmethod
    def apply(cls, *inputs, **options):
        fn = cls()
        fn.needs_input_grad = tuple(t.requires_grad for t in inputs)
        arrays = [t.data for t in inputs]
        if len(arrays) > 1:
            # Same dtype and array type as the first input: the common case costs two reads per input
            # (about 60 ns an op). Anything else goes to _check_operands, which lets integer and bool
            # inputs through and raises for mixed float precisions or a numpy/CuPy mix.
            dtype, array_type = arrays[0].dtype, type(arrays[0])
            for array in arrays:
                if array.dtype is not dtype or type(array) is not array_type:
                    _check_operands(cls, arrays)
                    break
        started = _trace.now() if _trace.recording is not None else None
        try:
            output = fn.forward(*arrays, **options)
        except OperandError:
            raise  # an op inside this op's forward already named its own inputs
        except ValueError as error:  # numpy's own words ("could not be broadcast") name no op
            raise OperandError(f"{cls.__name__} of {_describe(arrays)}: {str(error).strip()}") from error
        if started is not None:
            _trace.complete(cls.__name__, "compute", started)
        result = Tensor(output)
        if _grad_enabled and any(fn.needs_input_grad):
            fn.inputs = inputs
            result.requires_grad = True
            result._fn = fn
            if _saved_trackers:
                _record_saved(fn, inputs)
            if _saved_hooks:
                pack, fn.unpack = _saved_hooks[-1]
                fn.saved = tuple(pack(array) for array in fn.saved)
        else:
            fn.saved = ()  # nothing will call backward: keep nothing alive
        return result


class OperandError(ValueError):
    """An op's forward rejected its inputs (shapes that do not broadcast, a matmul's inner dimensions,
    ...): the message names the op and every input's dtype and shape; the array library's own error
    is chained as ``__cause__``."""


def _describe(arrays):
    """'float32 (3, 4) and float64 (4, 5)': what an error says about an op's inputs."""
    words = [f"{array.dtype} {tuple(array.shape)}" for array in arrays]
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def _check_operands(cls, arrays):
    """Raise ``TypeError`` if ``arrays`` (one op's inputs) mix numpy with CuPy, or mix floating dtypes.

    numpy would promote float32 + float64 to float64 without a word: float32 weights meeting a float64
    input would then run the whole model in float64, and a float32 run would not be one. Integer and
    bool inputs (ids, targets, masks) are not floating and do not count."""
    libraries = {type(array).__module__.split(".")[0] for array in arrays}
    if len(libraries) > 1:
        where = " and ".join(f"{type(a).__module__.split('.')[0]} {tuple(a.shape)}" for a in arrays)
        raise TypeError(f"{cls.__name__}: {where} operands: minitp never moves arrays between numpy (CPU) and "
                        "CuPy (GPU) behind your back; put them on one device (backend.from_host, "
                        "backend.to_host)")
    floating = [array for array in arrays if array.dtype.kind == "f"]
    if len({array.dtype for array in floating}) > 1:
        raise TypeError(f"{cls.__name__}: {_describe(floating)} operands: minitp never mixes precisions; "
                        "build them in one dtype")
