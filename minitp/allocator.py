"""Why does a fresh process run minitp's steps as fast as a warmed-up one? It keeps freed memory.

glibc's malloc hands every block over 128 KiB (more, once it has adapted) straight to the kernel with
``mmap`` and returns it with ``munmap`` when freed. A training step allocates and frees the same large
temporaries every time -- activations, gradients, the receive buffers of collectives -- so each one is
mapped afresh, and the kernel zeroes every page of it on first touch: measured here, that made
``comm.all_reduce`` 2-3x slower than a raw ``Allreduce`` into a preallocated buffer at 1-16 MiB, and
the block's step 10-30% slower.

``keep_freed_memory()`` (called when minitp is imported) tells glibc to serve every block from its heap
and to keep freed memory there (``mallopt``: ``M_MMAP_MAX`` 0, no block gets a mapping of its own;
``M_TRIM_THRESHOLD`` 1 GiB, the heap's free top is kept up to that much): the next step's temporaries reuse
the same, already mapped pages. (Raising ``M_MMAP_THRESHOLD`` instead, as ``MALLOC_MMAP_THRESHOLD_`` does,
stops at glibc's ceiling of 32 MiB: a 64 MiB all-gather's result was still faulted in afresh on every
call, 1.4x the raw call's time.) The price is that the process keeps the memory it has used at its peak
instead of returning it between steps -- what a training loop wants. If the heap cannot grow, glibc
still falls back to a mapping. Nothing happens outside glibc (macOS, musl), when the user has set any
``MALLOC_MMAP_*`` variable themselves, or with ``MINITP_MALLOC=default``.
"""
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2 ** 30


def keep_freed_memory():
    """Set glibc's parameters as above; returns True when they were set."""
    if os.environ.get("MINITP_MALLOC", "") == "default" or any(name.startswith("MALLOC_MMAP_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


KEPT = keep_freed_memory()
"""Whether this process keeps freed memory (benchmarks report it)."""
