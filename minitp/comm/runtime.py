"""How does each rank run under MPI? Abort on failure, a share of the cores, and how arrays reach MPI.

**Failures** (a rank that raises or leaves ends the job, with one message) are ``failures.py``'s.

**Cores.** ``init()`` also limits each rank's BLAS to its share of the node's cores, so that ranks on one
node do not start one BLAS thread per core each and fight over them.

**CuPy arrays** reach MPI one of two ways, because no MPI query reliably tells whether the library can
read GPU memory: by default they are staged through host memory (device -> host, MPI, host -> device);
with ``MINITP_CUDA_AWARE_MPI=1`` in the environment (or ``set_cuda_aware(True)``) the device buffers are
passed to MPI directly, after the current stream has finished writing them. ``transport()`` says which.
The setting lives here (``_cuda_aware``), beside ``_for_mpi``, the one function that acts on it.
"""
import os
import numpy
from mpi4py import MPI

from minitp import backend

# -- each rank's share of the cores -----------------------------------------------------------------

_blas_threads_limited = False


def _limit_blas_threads():
    """Give each rank its share of this node's cores for BLAS.

    numpy's BLAS starts one thread per core in every process; with r ranks on c cores that is r×c
    threads fighting for c cores, and the matmuls slow down instead of speeding up. So each rank gets
    max(1, c // r) threads (1 when ranks outnumber cores). A limit the user already set lower (e.g.
    OMP_NUM_THREADS=1) is kept.
    """
    global _blas_threads_limited
    if _blas_threads_limited:
        return
    _blas_threads_limited = True
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks that share this node's memory
    ranks_on_node = node.Get_size()
    node.Free()
    if ranks_on_node == 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // ranks_on_node)
    from threadpoolctl import threadpool_info, threadpool_limits
    if any(pool["num_threads"] > share for pool in threadpool_info() if pool["user_api"] == "blas"):
        threadpool_limits(limits=share, user_api="blas")


# -- how arrays reach MPI ---------------------------------------------------------------------------

_cuda_aware = os.environ.get("MINITP_CUDA_AWARE_MPI", "0") == "1"


def set_cuda_aware(enabled=True):
    """Pass CuPy device buffers straight to MPI (``True``) or stage them through the host (``False``).

    Only say ``True`` if your MPI was built with CUDA support (Open MPI with UCX/CUDA, MVAPICH2-GDR,
    Cray MPICH with GPU support...): a plain MPI given a device pointer crashes.
    """
    global _cuda_aware
    _cuda_aware = bool(enabled)


def transport():
    """A one-line description of how arrays reach MPI, for tutorial banners."""
    if backend.device() == "cpu":
        return "numpy buffers"
    return "CuPy device buffers (CUDA-aware MPI)" if _cuda_aware else "CuPy via host staging"


def _for_mpi(array):
    """``array`` (C-contiguous) in memory MPI can read: numpy as is; CuPy on the device when MPI is
    CUDA-aware, else copied to the host. Contiguity first, so a CuPy copy runs on the GPU."""
    if type(array) is numpy.ndarray and array.flags.c_contiguous:
        return array  # the common case, tested first: this runs before every collective
    xp = backend.array_module(array)
    array = xp.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes a 0-d array 1-d
    if xp is numpy:
        return array
    if _cuda_aware:
        backend.synchronize()  # MPI reads the memory directly: the kernels writing it must be done
        return array
    return backend.to_host(array)


def _like(result, original):
    """``result`` moved back to where ``original`` lives (the host-staging return trip)."""
    if isinstance(result, numpy.ndarray) and not isinstance(original, numpy.ndarray):
        return backend.array_module(original).asarray(result)
    return result
