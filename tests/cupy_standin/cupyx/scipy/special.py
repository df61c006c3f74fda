"""``cupyx.scipy.special`` of the stand-in: the error function, elementwise, in the input's precision."""
import math

import numpy

import cupy


def erf(x):
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    dtype = x.dtype if x.dtype.kind == "f" else numpy.float64
    return cupy._run(numpy.vectorize(math.erf, otypes=[dtype]), (x,), {})
