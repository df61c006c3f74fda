"""Which array library holds the numbers: numpy on the CPU, CuPy on a GPU.

This is the only file that chooses between them. Everything above it either asks for the current
module (``backend.xp``, to create arrays) or for the module of an array it was handed
(``array_module(a)``, inside ops), so one code path serves both.

Choose once, before creating tensors:

    MINITP_DEVICE=gpu mpirun -n 4 python tutorials/mlp.py     # environment variable
    minitp.backend.use("gpu")                                   # or from Python

With several MPI ranks on one machine, rank ``r`` takes GPU ``r % device_count``: ranks may share a GPU.
"""
import math
import os
import sys

import numpy

xp = numpy
"""The array module in use: ``numpy`` or ``cupy``. Read it as ``backend.xp`` at call time."""

_device = "cpu"


def use(device):
    """Select ``"cpu"`` (numpy) or ``"gpu"`` (CuPy) for arrays created from now on."""
    global xp, _device
    if device == "cpu":
        xp, _device = numpy, "cpu"
        return
    if device != "gpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    reason = gpu_unavailable_reason()
    if reason:
        raise RuntimeError(f"MINITP_DEVICE=gpu asked for, but {reason}")
    import cupy
    cupy.cuda.Device(local_rank() % cupy.cuda.runtime.getDeviceCount()).use()
    xp, _device = cupy, "gpu"


def device():
    """``"cpu"`` or ``"gpu"``."""
    return _device


def gpu_unavailable_reason():
    """``None`` when CuPy and a GPU are usable, else a sentence saying why not (tests skip with it)."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda12x)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, no device: CuPy raises its own CUDA errors
        return f"no usable GPU ({error})"
    return None if count > 0 else "no GPU found"


def local_rank():
    """This process's rank among the MPI ranks on its node, read from the launcher's environment.

    Read from the environment (not from MPI) so that the GPU can be chosen before MPI is touched.
    """
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                 "SLURM_LOCALID", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def array_module(array):
    """numpy or cupy: the module that owns ``array``."""
    if type(array) is numpy.ndarray:  # the common case first: every op asks, on every call
        return numpy
    if type(array).__module__.startswith("cupy"):
        import cupy
        return cupy
    return numpy


def compiles_kernels(array):
    """Whether ``array`` lives on a GPU whose CuPy compiles kernels (``cupy.RawKernel``): the fused kernels
    of ``minitp.kernels`` may run on it. False for numpy arrays, and for the tests' CuPy stand-in, which
    has no compiler (so the numpy definitions run there)."""
    if array_module(array) is numpy:
        return False
    import cupy
    return hasattr(cupy, "RawKernel")


def check_dtype(dtype):
    """``ValueError`` when arrays of ``dtype`` cannot live on the current device: CuPy has no bfloat16
    (ml_dtypes' bfloat16 is a numpy dtype only), so a bfloat16 model is refused on the GPU when its
    parameters are made, before any work. float16 runs on both (on numpy, products accumulate in fp32:
    ``minitp.functional.precision``)."""
    if _device == "gpu" and numpy.dtype(dtype).name == "bfloat16":
        raise ValueError("bfloat16 is not supported on the GPU (CuPy has no bfloat16 dtype): use float16 "
                         "or float32 there, or bfloat16 on the CPU (MINITP_DEVICE=cpu)")


def to_host(array):
    """A numpy copy of ``array`` (no copy if it already is one)."""
    if isinstance(array, (numpy.ndarray, numpy.generic)):
        return array
    return array.get()


def from_host(array):
    """``array`` moved to the current device."""
    return xp.asarray(array)


def data_ptr(array):
    """The address of ``array``'s first element: two views of the same memory share it."""
    if isinstance(array, (numpy.ndarray, numpy.generic)):
        return array.__array_interface__["data"][0]
    return array.data.ptr


def synchronize():
    """Wait for the GPU to finish queued work (a no-op on the CPU): needed before timing, and before a
    CUDA-aware MPI reads a device buffer."""
    if _device == "gpu":
        import cupy
        cupy.cuda.get_current_stream().synchronize()


def erf(array):
    """The error function, elementwise: exact GeLU needs it and numpy lacks it."""
    if array_module(array) is not numpy:
        from cupyx.scipy.special import erf as cupy_erf
        return cupy_erf(array)
    try:
        from scipy.special import erf as scipy_erf
    except ImportError:
        return _erf_python(array).astype(array.dtype, copy=False)
    return scipy_erf(array).astype(array.dtype, copy=False)  # bfloat16 goes through scipy's float32 loop


_erf_python = numpy.vectorize(math.erf, otypes=[numpy.float64])


def _world_rank_from_environment():
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def _use_the_environments_device():
    """``MINITP_DEVICE`` (unset or empty: the CPU). One it cannot use is a configuration error of the
    whole job, not of a line of code: world rank 0 says so in one line, and every rank exits with status 2
    (a traceback per rank would repeat the same sentence N times)."""
    wanted = os.environ.get("MINITP_DEVICE") or "cpu"
    try:
        use(wanted)
    except (ValueError, RuntimeError) as error:
        message = str(error) if wanted in ("cpu", "gpu") else f"MINITP_DEVICE={wanted!r}: {error}"
        if _world_rank_from_environment() == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


_use_the_environments_device()
