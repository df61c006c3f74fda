"""A strict stand-in for CuPy, so that minitp's GPU path runs in the tests on machines without a GPU.

Each ``cupy.ndarray`` holds a numpy array (``_a``, the "device memory") and every op runs numpy on it,
but under CuPy's rules, which are what the GPU path must get right:

- an array never becomes a numpy array implicitly: ``numpy.asarray(x)`` raises CuPy's TypeError, and so
  does anything that would need one (``numpy.random.choice(p=x)``, the buffer protocol);
  ``x.get()`` / ``cupy.asnumpy(x)`` copy to the host, ``cupy.asarray(host)`` copies to the device;
- a numpy array where CuPy wants a device array is refused (``x + host``, ``cupy.concatenate([x,
  host])``); numpy scalars and Python numbers are fine, as in CuPy;
- ``float(x)``, ``int(x)``, ``bool(x)``, ``x.item()`` of a one-element array copy it to the host, as in
  CuPy (no ``__index__``: ``range(x)`` fails there too); reductions return 0-d arrays, not scalars;
- numpy functions and ufuncs called on device arrays dispatch to the stand-in's own
  (``__array_function__``, ``__array_ufunc__``), as CuPy's do, and fail for those it lacks;
- memory reaches another library (a CUDA-aware MPI; mpi4py takes it through ``__dlpack__``) only when
  the stand-in is told that MPI can read device memory (``_standin.py``), and only after the stream was
  synchronised since the last op: an op queued and not waited for is the race a real GPU would have.

Only the part of CuPy's API that minitp and its tests use is here; anything else is an AttributeError
saying so. CuPy aliases numpy's dtypes, and so does the stand-in. ``tests/conftest.py`` puts this
directory on ``sys.path`` (and ``PYTHONPATH``, for the tutorials the tests launch) when real CuPy with a
GPU is not available.
"""
import builtins  # Python's any and all: the module's own names (cupy.sum, ...) may shadow builtins
import weakref

import numpy
from numpy import (bool_, dtype, float16, float32, float64, inf, int8, int16, int32, int64,  # noqa: F401
                   nan, newaxis, uint8, uint16, uint32, uint64)

from cupy import _standin, cuda

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")
_SCALARS = (int, float, bool, complex, numpy.generic)


# -- arguments in, results out ----------------------------------------------------------------------

def _operand(x):
    """An operand of an elementwise op: a device array or a number, what CuPy's kernels take."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    raise TypeError(f"Unsupported type {type(x)}")


def _unwrap(x):
    """Any other argument: device arrays unwrapped, also inside lists and tuples; host arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if type(x) in (list, tuple):
        return type(x)(_unwrap(item) for item in x)
    return x


def _index(index):
    """An index: device arrays unwrapped; host arrays and lists are copied to the device, as CuPy does."""
    if isinstance(index, ndarray):
        return index._a
    if type(index) is tuple:
        return tuple(_index(i) for i in index)
    return index


_OWNERS = weakref.WeakValueDictionary()  # id(numpy array owning its memory) -> the device array wrapping it


def _owner(array):
    """The numpy array that owns ``array``'s memory (``array`` itself when it does; None when a buffer
    that is not an array does, as after ``numpy.frombuffer``)."""
    while isinstance(array.base, numpy.ndarray):
        array = array.base
    return array if array.base is None else None


def _wrap(x):
    """A result on the device: numpy arrays and scalars become arrays (reductions give 0-d arrays)."""
    if isinstance(x, (numpy.ndarray, numpy.generic)):
        return ndarray._on_device(numpy.asarray(x))
    if type(x) in (list, tuple):
        return type(x)(_wrap(item) for item in x)
    return x


def _run(function, args, kwargs, operand=_unwrap, this=None):
    """``function`` (numpy's) on the arrays behind ``args``; the result on the device. An op is queued
    on the stream (``_standin.queued``) unless all it made is a view of its input, as in CuPy."""
    out = kwargs.get("out")
    if out is not None and not isinstance(out, ndarray):
        raise TypeError(f"out must be a cupy.ndarray, not {type(out)}")
    raw = [operand(a) for a in args]
    result = function(*raw, **{k: _unwrap(v) for k, v in kwargs.items()})
    inputs = [a for a in raw + [this] if isinstance(a, numpy.ndarray)]
    if isinstance(result, (numpy.ndarray, numpy.generic)) or out is not None:
        view = out is None and isinstance(result, numpy.ndarray) and builtins.any(
            numpy.may_share_memory(result, a) for a in inputs)
        _standin.queued = _standin.queued or not view
    if out is not None and result is out._a:
        return out
    return _wrap(result)


# -- the array --------------------------------------------------------------------------------------

def _defers_to(other):
    """CuPy's rule for ``x <op> other``: let ``other``'s reflected operator run if it opts out of
    numpy's ufuncs (``__array_ufunc__ = None``) or, having none, has a higher ``__array_priority__``."""
    if isinstance(other, ndarray):
        return False
    ufunc = getattr(other, "__array_ufunc__", _defers_to)
    if ufunc is not _defers_to:
        return ufunc is None
    return ndarray.__array_priority__ < getattr(other, "__array_priority__", 0)


class ndarray:
    """An array in (pretend) device memory. Attributes and methods: those of numpy that minitp uses."""

    __slots__ = ("_a", "_device", "_base", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, order="C"):
        self._a = numpy.empty(shape, dtype, order=order)
        self._device, self._base = _standin.current_device, None
        _OWNERS[id(self._a)] = self

    @classmethod
    def _on_device(cls, array):
        self = object.__new__(cls)
        self._a, self._device, self._base = array, _standin.current_device, None
        owner = _owner(array)
        if owner is array:
            _OWNERS[id(array)] = self
        elif owner is not None:  # a view: like CuPy's, it holds the array that owns the memory, as ``base``
            self._base = _OWNERS.get(id(owner))
            if self._base is None or self._base._a is not owner:
                self._base = ndarray._on_device(owner)
        return self

    base = property(lambda self: self._base)

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._on_device(self._a.T))
    device = property(lambda self: cuda.Device(self._device))
    data = property(lambda self: cuda.MemoryPointer(self._a.__array_interface__["data"][0]))

    # -- to and from the host: explicit, or a one-element array to a Python number, as in CuPy

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A numpy copy (waits for the stream, as CuPy's blocking copy does)."""
        _standin.queued = False
        _standin.copies_to_host += 1
        if out is not None:
            out[...] = self._a
            return out
        return numpy.array(self._a, order=order)

    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self.get().item()

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __int__(self):
        return int(self.get())

    def __float__(self):
        return float(self.get())

    def __bool__(self):
        if self.size > 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        return bool(self.get())

    def __repr__(self):
        return repr(self.get())

    def __str__(self):
        return str(self.get())

    def __format__(self, spec):
        return format(self.get(), spec)

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        return _run(self._a.__getitem__, (_index(index),), {}, operand=lambda i: i, this=self._a)

    def __setitem__(self, index, value):
        self._a[_index(index)] = value._a if isinstance(value, ndarray) else value  # host values: copied
        _standin.queued = True

    # -- handing memory to another library: a CUDA-aware MPI. mpi4py asks for DLPack first (as it does of
    # CuPy), with stream=-1: it will not wait for the stream, so whoever hands the buffer over must have.

    def __dlpack_device__(self):
        return (2, self._device)  # kDLCUDA: device memory

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if dl_device is not None and dl_device[0] == 1:  # asked for on the host (numpy.from_dlpack): a copy
            return self.get().__dlpack__(max_version=max_version)
        if not _standin.cuda_aware_mpi:
            raise TypeError("a device buffer was handed over through DLPack, but MPI here cannot read "
                            "device memory (CUPY_STANDIN_CUDA_AWARE_MPI is not 1): stage it through the host")
        if _standin.queued:
            raise RuntimeError("a device buffer was handed to another library while ops were still queued "
                               "on the stream: it may read the memory before they have written it; "
                               "synchronize first (cupy.cuda.get_current_stream().synchronize())")
        _standin.buffers_to_mpi += 1
        return self._a.__dlpack__(max_version=max_version, copy=False)  # the memory behind the array

    @property
    def __cuda_array_interface__(self):
        """Where the memory is (inspection only: MPI takes it through ``__dlpack__``)."""
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3, "stream": 1,
                "data": (self.data.ptr if self.size else 0, False),
                "strides": None if self._a.flags.c_contiguous else self._a.strides}

    # -- numpy's functions and ufuncs on device arrays run the stand-in's, as CuPy's do

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        mine = _UFUNCS.get(ufunc.__name__)
        if mine is None or method not in ("__call__", "at"):
            return NotImplemented
        if "out" in kwargs:
            (kwargs["out"],) = kwargs["out"]
        return (mine if method == "__call__" else mine.at)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        mine = _ARRAY_FUNCTIONS.get(func.__name__) if func.__module__ == "numpy" else None
        if mine is None or not builtins.all(issubclass(t, (ndarray, numpy.ndarray)) for t in types):
            return NotImplemented
        return mine(*args, **kwargs)


def _method(name):
    def method(self, *args, **kwargs):
        return _run(getattr(self._a, name), args, kwargs, this=self._a)
    method.__name__ = name
    return method


for _name in ("reshape", "transpose", "ravel", "astype", "copy", "sum", "max", "min", "mean", "all"):
    setattr(ndarray, _name, _method(_name))


# -- ufuncs: elementwise, operands device arrays or numbers -----------------------------------------

class ufunc:
    def __init__(self, numpy_ufunc):
        self._ufunc = numpy_ufunc
        self.__name__ = numpy_ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _run(self._ufunc, args, kwargs, operand=_operand)

    def at(self, a, indices, b=None):
        """In place: ``a[indices] op= b`` with repeated indices applied once each (CuPy's scatter)."""
        if not isinstance(a, ndarray):
            raise TypeError(f"Unsupported type {type(a)}")
        self._ufunc.at(a._a, _index(indices), *(() if b is None else (_index(b),)))
        _standin.queued = True

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


_UFUNCS = {}
for _name in ("add subtract multiply divide floor_divide remainder power matmul bitwise_and bitwise_or "
              "bitwise_xor left_shift right_shift less less_equal equal not_equal greater greater_equal "
              "negative positive absolute invert exp log sqrt tanh maximum reciprocal isfinite").split():  # the operators', minitp's
    globals()[_name] = _UFUNCS[getattr(numpy, _name).__name__] = ufunc(getattr(numpy, _name))


def _binary(name, reflected=False, inplace=False):
    function = _UFUNCS[getattr(numpy, name).__name__]

    def operator(self, other):
        if inplace:
            return function(self, other, out=self)
        if _defers_to(other):
            return NotImplemented
        return function(other, self) if reflected else function(self, other)
    return operator


for _op, _name in dict(add="add", sub="subtract", mul="multiply", truediv="divide",
                       floordiv="floor_divide", mod="remainder", pow="power", matmul="matmul",
                       and_="bitwise_and", or_="bitwise_or", xor="bitwise_xor", lshift="left_shift",
                       rshift="right_shift").items():
    _op = _op.rstrip("_")
    setattr(ndarray, f"__{_op}__", _binary(_name))
    setattr(ndarray, f"__r{_op}__", _binary(_name, reflected=True))
    setattr(ndarray, f"__i{_op}__", _binary(_name, inplace=True))
for _op, _name in dict(lt="less", le="less_equal", eq="equal", ne="not_equal", gt="greater",
                       ge="greater_equal").items():
    setattr(ndarray, f"__{_op}__", _binary(_name))
for _op, _name in dict(neg="negative", pos="positive", abs="absolute", invert="invert").items():
    setattr(ndarray, f"__{_op}__", lambda self, _name=_name: _UFUNCS[_name](self))


# -- functions --------------------------------------------------------------------------------------

def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """A new device array: from a device array, or copied from the host (numpy arrays, lists, numbers)."""
    if isinstance(obj, ndarray):
        return _run(numpy.array, (obj,), dict(dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    _standin.queued = True  # the copy to the device may still be in flight
    return ndarray._on_device(numpy.array(obj, dtype=dtype, order=order, ndmin=ndmin))


def asarray(a, dtype=None, order=None):
    """``a`` itself if it is a device array of ``dtype``; else a device copy."""
    if isinstance(a, ndarray) and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype, order=order or "K")


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A numpy copy of a device array (a host array is returned as it is)."""
    return a.get(order=order, out=out) if isinstance(a, ndarray) else numpy.asarray(a, order=order)


def empty(shape, dtype=float, order="C"):
    return ndarray._on_device(numpy.empty(shape, dtype, order=order))  # an allocation: nothing queued


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    if not isinstance(prototype, ndarray):
        raise TypeError(f"Unsupported type {type(prototype)}")
    return ndarray._on_device(numpy.empty_like(prototype._a, dtype, order, shape=shape))


def _function(numpy_function):
    def function(*args, **kwargs):
        return _run(numpy_function, args, kwargs)
    function.__name__ = numpy_function.__name__
    function.__doc__ = f"numpy.{numpy_function.__name__} on device arrays."
    return function


for _name in ("zeros ones full zeros_like ones_like arange ascontiguousarray concatenate stack swapaxes moveaxis "
              "broadcast_to where take take_along_axis sum vdot shares_memory").split():
    globals()[_name] = _function(getattr(numpy, _name))

_ARRAY_FUNCTIONS = {name: value for name, value in globals().items()
                    if callable(value) and not name.startswith("_") and not isinstance(value, type)}


def __getattr__(name):
    raise AttributeError(f"the CuPy stand-in (tests/cupy_standin) has no cupy.{name}: minitp did not use "
                         "it so far; if CuPy has it, add it there")
