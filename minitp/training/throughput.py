"""How fast is a run, against how fast this machine multiplies matrices? Model FLOPs utilisation.

    MFU = (model flops of a step / seconds per step) / (the machine's measured GEMM rate)

The model flops are the planner's formula (``minitp.plan.flops.model_flops``: Narayanan et al. 2021,
eq. 3, without recomputation -- PaLM's MFU counts the model's flops, not the ones recomputation adds, so
recomputing shows as a lower MFU, which it is). The rate is MEASURED, not a datasheet's peak: every rank
times a square GEMM in the run's dtype at the same moment (so ranks sharing cores or one GPU share them
here too), and the machine's rate is the sum over the ranks. A CPU's datasheet peak assumes every core's
vector units full, which BLAS at this size reaches only in part; the measured rate is what this
framework's GEMMs could get, so MFU says how much of the step is not GEMM (softmax, LayerNorm, the
optimizer, communication, Python).
"""
import time

import numpy
from mpi4py import MPI

from minitp import backend
from minitp.functional.precision import product
from minitp.plan.flops import model_flops


def gemm_rate(dtype, n=None, repeats=8):
    """flops/s of an n×n @ n×n product in ``dtype`` on this rank's device (2n³ flops), the best of
    ``repeats`` after one warm-up (the best: on a machine shared with other work, the time least disturbed
    by it; a rate measured while other processes ran is too low, and the MFU against it too high -- above
    100% says so). n unset: 1024 on the CPU (a few tens of milliseconds each), 4096 on a GPU."""
    gpu = backend.device() == "gpu"
    # a 2-byte float on numpy multiplies as the model's products do (precision.product: fp32 BLAS, one
    # rounding), so the rate is the model's own; numpy's fp16 @ alone would be ~100x slower than fp32
    n = n or (4096 if gpu else 1024)
    xp = backend.array_module(backend.from_host(numpy.zeros(1)))
    a = xp.asarray(numpy.random.default_rng(0).standard_normal((n, n)).astype(dtype))
    b = a.T.copy()
    best = float("inf")
    for attempt in range(repeats + 1):
        backend.synchronize()
        started = time.perf_counter()
        product(a, b)
        backend.synchronize()
        if attempt:  # the first one loads the BLAS, warms the caches, compiles
            best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best


def machine_gemm_rate(dtype, world):
    """The sum over ``world``'s ranks (an mpi4py communicator) of ``gemm_rate``, measured by all at once."""
    world.Barrier()
    return world.allreduce(gemm_rate(dtype), op=MPI.SUM)


def step_flops(batch, seq, layers, hidden, vocab, ffn_hidden=None, top_k=1):
    """Model flops of one training step of the global batch (``model_flops``' "none"); with experts, each
    token runs ``top_k`` MLPs (the router's h·E per token is left out: below 1% at these sizes)."""
    ffn = (ffn_hidden or 4 * hidden) * top_k
    return model_flops(batch, seq, layers, hidden, vocab, ffn)["none"]
