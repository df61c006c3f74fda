"""Fused GPU kernels: the chains of elementwise passes that the numpy definitions make over memory, each
written as one CUDA pass (``cupy.ElementwiseKernel``, ``cupy.RawKernel``).

The numpy code in ``minitp.functional`` and ``minitp.nn.optim`` stays the definition; on a GPU each op
asks ``enabled(array)`` and, where it says yes, runs the kernel here that computes the same numbers (to
rounding: the GPU may fuse a multiply and an add). ``tests/test_kernels.py`` compares every kernel with
its definition in float32 and float64 on a real GPU.

    elementwise.py   bias + GeLU forward and backward, dropout's counter hash, AdamW's update
    rows.py          LayerNorm forward and backward, the scaled (causal) softmax and its backward,
                     cross-entropy's forward -- one thread block per row, its reductions in shared memory

Why fuse: GeLU's forward is eight passes over the (s, b, ffn) activation in numpy, the dropout hash a
dozen over 8-byte integers, AdamW ten over four parameter-sized arrays. On a CPU minitp walks them in
cache-sized blocks (``minitp.blocks``); a GPU has no such cache to fill, and each pass is a kernel launch
and a round trip through its memory: one kernel reads each input once and writes each output once.
"""
import os

import numpy

from minitp import backend

_compiled = {}


def enabled(array):
    """Whether ``array``'s ops run the fused kernels: it is a real CuPy array (one whose CuPy can compile
    kernels: the strict stand-in of the tests cannot, and runs the numpy definitions) and
    ``MINITP_KERNELS`` is not ``0`` (the definitions on the GPU, to compare)."""
    return backend.compiles_kernels(array) and os.environ.get("MINITP_KERNELS", "1") != "0"


def compiled(name, dtype, build):
    """The kernel ``name`` for ``dtype``, built once per process by ``build(cupy, ctype)``."""
    import cupy
    key = (name, numpy.dtype(dtype).name)
    if key not in _compiled:
        _compiled[key] = build(cupy, ctype(dtype))
    return _compiled[key]


def ctype(dtype):
    """The C type of a float32 or float64 array."""
    names = {"float32": "float", "float64": "double"}
    name = numpy.dtype(dtype).name
    if name not in names:
        raise TypeError(f"the fused kernels take float32 or float64 arrays, not {name}")
    return names[name]
