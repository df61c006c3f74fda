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

**What minitp runs** (``minitp.parallel.data.zero`` and ``zero3``; ``tests/test_plan.py`` measures every
figure below byte for byte at 1, 2 and 4 ranks): one dtype for everything (float32 or float64: no master
copy, K = 2e for AdamW's two moments). Stages 1 and 2 shard the *flat gradient buckets*
(``parallel.buckets._layout``); stage 3 shards *units* (``parallel.data.units``: the embeddings wte + wpe,
each transformer block, the head ln_f (+ lm_head)). A bucket or unit of n elements is padded to d·⌈n/d⌉
and rank r keeps [r·⌈n/d⌉, (r+1)·⌈n/d⌉). Per rank:

    stage   parameters            gradients (end of backward)   optimizer state
    0       Ψe                    Ψe                            2eΨ
    1       Ψe                    Ψe (reduce-scattered after)   2e·|[r⌈n/d⌉, (r+1)⌈n/d⌉) ∩ [0, n)| per bucket
    2       Ψe                    Σ_b ⌈n_b/d⌉·e                 the same, per bucket
    3       Σ_u ⌈n_u/d⌉·e + e     Σ_u ⌈n_u/d⌉·e                 the same, per unit

The padding has no optimizer state, so the last ranks may hold fewer elements (``zero1_elements``); the
gradient slices and stage 3's parameter slices are ⌈n/d⌉ long on every rank, padding included. Stage 3's
"+ e": a freed parameter is a read-only broadcast of one NaN of its shape (``zero3.ShardedUnits
._placeholder``), one element per dtype. Stage 1's whole gradient is alive until the end of backward
(reduce-scattered in ``finish``); stage 2 reduce-scatters each bucket inside backward as soon as it is
complete and drops its ``.grad`` -- but for the table tied across pipeline stages, last and alone in its
bucket, whose whole gradient waits for the two ends' sum after backward. The paper's KΨ/N_d,
(2 + K)Ψ/N_d, (2 + 2 + K)Ψ/N_d are these without the padding rule and the placeholder. Stage 3 with
pipeline stages (pp > 1) is refused by minitp (``zero3.check_mesh``): there the planner gives the same
per-stage formula, marked formula only.

Mixed precision without ZeRO is what ``train_gpt.py --dtype fp16`` runs (``nn.master_weights.MasterWeights``:
2Ψ fp16 parameters, 2Ψ fp16 gradients, 4Ψ fp32 master copies, 8Ψ fp32 moments; measured byte for byte).
With ZeRO (which minitp's fp16 refuses) the figures are the paper's formulas, formula only; so is bf16.

Experts (``Model.experts``, ``Mesh.ep``): a rank holds its E/ep experts (each split over tp) and the
replicated router (h·E, no bias); its parameters, gradients and AdamW state are measured at zero 0, pp 1.
"""
import math

from minitp.plan.shapes import ITEMSIZE


def zero_paper(psi, nd, stage, K=12):
    """Rajbhandari et al. 2020, section 5.1: model-state bytes per replica, mixed precision (2 + 2 + K)."""
    return {0: (2 + 2 + K) * psi, 1: (2 + 2) * psi + K * psi / nd, 2: 2 * psi + (2 + K) * psi / nd,
            3: (2 + 2 + K) * psi / nd}[stage]


def buckets(tensors, itemsize, bucket_bytes):
    """minitp's bucket layout (``parallel.data.buckets._layout``): consecutive parameters in model order, at
    most ``bucket_bytes`` each (a larger parameter alone). Returns the element count of each bucket.

    The token table tied across pipeline stages (``Tensor.tied``) goes last, in a bucket of its own
    (``GradientBuckets``: its gradient must first be summed over the two ends); measured with dp·cp > 1 by
    tests/test_plan_context.py, where the plan had counted it in the first bucket."""
    def layout(run):
        sizes, current = [], 0
        for tensor in run:
            nbytes = tensor.elements * itemsize
            if not sizes or current + nbytes > bucket_bytes:
                sizes.append(0)
                current = 0
            sizes[-1] += tensor.elements
            current += nbytes
        return sizes
    return layout([t for t in tensors if not t.tied]) + layout([t for t in tensors if t.tied])


def zero1_elements(bucket_sizes, d, rank):
    """Elements of optimizer state dp rank ``rank`` keeps under minitp's ZeRO-1: each bucket of n elements is
    padded to d·⌈n/d⌉, rank r takes [r·⌈n/d⌉, (r+1)·⌈n/d⌉), and only real elements (< n) have state."""
    total = 0
    for n in bucket_sizes:
        length = math.ceil(n / d)
        total += max(0, min(n, (rank + 1) * length) - rank * length)
    return total


def units(tensors):
    """minitp's ZeRO-3 units (``parallel.data.units.gpt_units``) of one rank's ``tensors`` (model order):
    [(name, elements)] -- "embeddings" (wte, wpe), "blocks.i" each, "head" (ln_f, lm_head; on a last pipeline
    stage also the tied table's copy, a layout minitp does not run: it refuses ZeRO-3 with pp > 1)."""
    found = []
    for tensor in tensors:
        if tensor.name.startswith("blocks."):
            name = ".".join(tensor.name.split(".")[:2])
        elif tensor.name in ("wte.weight", "wpe.weight"):
            name = "embeddings"
        else:
            name = "head"
        if not found or found[-1][0] != name:
            found.append([name, 0])
        found[-1][1] += tensor.elements
    return [tuple(unit) for unit in found]


def padded_slices(sizes, d):
    """Σ ⌈n/d⌉: the elements of one rank's slices of buckets or units of ``sizes``, padding included."""
    return sum(-(-n // d) for n in sizes)


def sharded_groups(tensors, choices, d):
    """The element counts ZeRO shards: the gradient buckets (stages 1, 2) or the units (stage 3)."""
    if choices.zero == 3:
        return [n for _, n in units(tensors)]
    return buckets(tensors, ITEMSIZE[choices.precision], choices.bucket_bytes)


def model_states(psi, tensors, d, dp_rank, choices):
    """{parameters, gradients, optimizer, master weights: (bytes, source)} on one rank holding ``psi``
    parameters (``tensors``, in model order), d = the ranks its parameters are replicated over."""
    zero = choices.zero
    if not choices.mixed:
        e = ITEMSIZE[choices.precision]
        K = choices.optimizer_buffers * e
        states = {"parameters": (psi * e, "Ψ·e (one dtype, as minitp runs)"),
                  "gradients": (psi * e, "Ψ·e: .grad in the parameters' dtype, whole at the end of backward")}
        if zero == 0:
            states["optimizer state"] = (psi * K, "AdamW's 2 moments: 2Ψ·e (nn.AdamW)")
            return states
        groups = sharded_groups(tensors, choices, d)
        what = "unit" if zero == 3 else "bucket"
        states["optimizer state"] = (zero1_elements(groups, d, dp_rank) * K,
                                     f"ZeRO-{zero} over the padded {what}s: 2e·|[r⌈n/d⌉, (r+1)⌈n/d⌉) ∩ [0, n)| "
                                     f"per {what} (minitp.parallel.data.zero{'3' if zero == 3 else ''}; "
                                     "Rajbhandari et al. 2020 §5.1: KΨ/N_d)")
        if zero >= 2:
            states["gradients"] = (padded_slices(groups, d) * e,
                                   f"ZeRO-{zero}: Σ⌈n/d⌉·e, this rank's reduce-scattered slice of each {what} "
                                   "(Rajbhandari et al. 2020 §5.2: Ψe/N_d)")
        tied = sum(tensor.elements for tensor in tensors if tensor.tied)
        if zero == 2 and tied:
            # the tied table's bucket (the last) is reduced only after backward, once the two ends have summed
            # it (parallel.data.buckets): its whole gradient is alive then, not a slice (measured, pp × cp)
            states["gradients"] = ((padded_slices(groups[:-1], d) + tied) * e,
                                   "ZeRO-2: Σ⌈n/d⌉·e over the buckets but the tied table's, whole (n·e): it is "
                                   "summed over the two ends after backward, then reduce-scattered "
                                   "(Rajbhandari et al. 2020 §5.2: Ψe/N_d)")
        if zero == 3:
            states["parameters"] = (padded_slices(groups, d) * e + e,
                                    "ZeRO-3: Σ_u⌈n_u/d⌉·e + e, this rank's slice of each unit and the freed "
                                    "parameters' one-element placeholder (Rajbhandari et al. 2020 §5.3: Ψe/N_d)")
        return states
    # mixed precision: 2-byte parameters and gradients, fp32 master + 2 fp32 moments (K = 12). Without ZeRO
    # this is what minitp's fp16 runs (MasterWeights: master copies 4Ψ, AdamW's moments 8Ψ; measured by
    # tests/test_plan.py); with ZeRO (refused by minitp's fp16) and bf16 it is the paper's formula only
    if zero == 0:
        cite = "Rajbhandari et al. 2020 §5.1, mixed precision (minitp.nn.master_weights.MasterWeights)"
        return {"parameters": (2 * psi, f"2Ψ (the model in fp16), {cite}"),
                "gradients": (2 * psi, f"2Ψ (.grad in fp16), {cite}"),
                "master weights": (4 * psi, f"4Ψ (fp32 copies), {cite}"),
                "optimizer state": (choices.optimizer_buffers * 4 * psi, f"8Ψ (AdamW's 2 fp32 moments), {cite}")}
    cite = "Rajbhandari et al. 2020 §5.1, mixed precision (formula only)"
    states = {"parameters": (2 * psi / (d if zero >= 3 else 1), f"2Ψ{'/N_d' if zero >= 3 else ''}, {cite}"),
              "gradients": (2 * psi / (d if zero >= 2 else 1), f"2Ψ{'/N_d' if zero >= 2 else ''}, {cite}"),
              "master weights": (4 * psi / (d if zero >= 1 else 1), f"4Ψ{'/N_d' if zero >= 1 else ''} (fp32), {cite}"),
              "optimizer state": (8 * psi / (d if zero >= 1 else 1), f"8Ψ{'/N_d' if zero >= 1 else ''} (fp32 moments), {cite}")}
    return states
