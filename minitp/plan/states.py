"""Parameters, gradients, optimizer state and master weights per rank, in bytes -- plain data parallelism and
the ZeRO stages.

**The paper.** Rajbhandari et al. 2020 (arXiv 1910.02054), section 5 and figure 1: Ψ parameters, N_d
data-parallel replicas, mixed-precision Adam (2-byte parameters and gradients, K = 12 bytes of fp32 master
weights, momentum and variance per parameter):

    baseline            (2 + 2 + K)Ψ
    P_os   (stage 1)    (2 + 2)Ψ + KΨ/N_d
    P_os+g (stage 2)    2Ψ + (2 + K)Ψ/N_d
    P_os+g+p (stage 3)  (2 + 2 + K)Ψ/N_d

Their example, Ψ = 7.5B, N_d = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB (GB = 1e9 bytes). ``zero_paper``.

**What minitp runs** (``minitp.parallel.data.zero``, measured byte for byte by ``ZeroOptimizer.state_bytes``):
one dtype for everything (float32 or float64: no master copy, K = 2e for AdamW's two moments), and ZeRO
stage 1 over the *flat gradient buckets*: a bucket of n elements is padded to d·⌈n/d⌉ and rank r keeps the
moments of [r·⌈n/d⌉, (r+1)·⌈n/d⌉) ∩ [0, n) -- the padding has no state, so the last ranks may hold fewer
elements (``zero1_elements``). The paper's KΨ/N_d is that without the padding rule.

Stages 2 and 3 and mixed precision are not built in minitp: their figures here are the paper's formulas
(formula only: not yet measured against minitp).
"""
import math

from minitp.plan.shapes import ITEMSIZE


def zero_paper(psi, nd, stage, K=12):
    """Rajbhandari et al. 2020, section 5.1: model-state bytes per replica, mixed precision (2 + 2 + K)."""
    return {0: (2 + 2 + K) * psi, 1: (2 + 2) * psi + K * psi / nd, 2: 2 * psi + (2 + K) * psi / nd,
            3: (2 + 2 + K) * psi / nd}[stage]


def buckets(tensors, itemsize, bucket_bytes):
    """minitp's bucket layout (``parallel.buckets._layout``): consecutive parameters in model order, at most
    ``bucket_bytes`` each (a larger parameter alone). Returns the element count of each bucket."""
    sizes, current = [], 0
    for tensor in tensors:
        nbytes = tensor.elements * itemsize
        if not sizes or current + nbytes > bucket_bytes:
            sizes.append(0)
            current = 0
        sizes[-1] += tensor.elements
        current += nbytes
    return sizes


def zero1_elements(bucket_sizes, d, rank):
    """Elements of optimizer state dp rank ``rank`` keeps under minitp's ZeRO-1: each bucket of n elements is
    padded to d·⌈n/d⌉, rank r takes [r·⌈n/d⌉, (r+1)·⌈n/d⌉), and only real elements (< n) have state."""
    total = 0
    for n in bucket_sizes:
        length = math.ceil(n / d)
        total += max(0, min(n, (rank + 1) * length) - rank * length)
    return total


def model_states(psi, tensors, d, dp_rank, choices):
    """{parameters, gradients, optimizer, master weights: (bytes, source)} on one rank holding ``psi``
    parameters (``tensors``, in model order), d = the ranks its parameters are replicated over."""
    zero = choices.zero
    if not choices.mixed:
        e = ITEMSIZE[choices.precision]
        K = choices.optimizer_buffers * e
        states = {"parameters": (psi * e, "Ψ·e (one dtype, as minitp runs)"),
                  "gradients": (psi * e, "Ψ·e: .grad in the parameters' dtype")}
        if zero == 0:
            states["optimizer state"] = (psi * K, "AdamW's 2 moments: 2Ψ·e (nn.AdamW)")
        elif zero == 1:
            sizes = buckets(tensors, e, choices.bucket_bytes)
            states["optimizer state"] = (zero1_elements(sizes, d, dp_rank) * K,
                                         "ZeRO-1 over the padded buckets: 2e·|[r⌈n/d⌉, (r+1)⌈n/d⌉) ∩ [0, n)| "
                                         "per bucket (minitp.parallel.data.zero; Rajbhandari et al. 2020 §5.1: KΨ/N_d)")
        else:  # formula only
            states["optimizer state"] = (psi * K / d, f"KΨ/N_d, Rajbhandari et al. 2020 §5.1 (formula only)")
            states["gradients"] = (psi * e / d, "ZeRO-2/3: Ψe/N_d, Rajbhandari et al. 2020 §5.2 (formula only)")
            if zero == 3:
                states["parameters"] = (psi * e / d, "ZeRO-3: Ψe/N_d, Rajbhandari et al. 2020 §5.3 (formula only)")
        return states
    # mixed precision (formula only): 2-byte parameters and gradients, fp32 master + 2 fp32 moments (K = 12)
    cite = "Rajbhandari et al. 2020 §5.1, mixed precision (formula only)"
    states = {"parameters": (2 * psi / (d if zero >= 3 else 1), f"2Ψ{'/N_d' if zero >= 3 else ''}, {cite}"),
              "gradients": (2 * psi / (d if zero >= 2 else 1), f"2Ψ{'/N_d' if zero >= 2 else ''}, {cite}"),
              "master weights": (4 * psi / (d if zero >= 1 else 1), f"4Ψ{'/N_d' if zero >= 1 else ''} (fp32), {cite}"),
              "optimizer state": (8 * psi / (d if zero >= 1 else 1), f"8Ψ{'/N_d' if zero >= 1 else ''} (fp32 moments), {cite}")}
    return states
