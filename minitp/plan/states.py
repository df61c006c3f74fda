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

**Mixed precision** (bf16 or fp16, ``train_gpt.py --dtype``; measured byte for byte at ZeRO 0-3, 1, 2 and 4
ranks, and on pipeline stages): the model in 2 bytes (e = 2), fp32 masters and fp32 AdamW moments (K = 12).
ZeRO 0 is ``nn.master_weights.MasterWeights``: 2Ψ parameters, 2Ψ gradients, 4Ψ master copies, 8Ψ moments.
ZeRO 1-3 (``ZeroOptimizer`` / ``FullyShardedOptimizer`` with ``master_dtype=numpy.float32``) keep the fp32
master of this rank's slice only, as optimizer state "master": the table above with e = 2, the moments at
8 bytes and the masters at 4 bytes per element of |[r⌈n/d⌉, (r+1)⌈n/d⌉) ∩ [0, n)| (the buckets laid out by
the 2-byte parameters' bytes). The gradients at the end of backward are the 2-byte ``.grad`` arrays (stages
0, 1) or the reduced slices (stages 2, 3), which ``grad_reduce="fp32"`` (``reduce_dtype=numpy.float32``)
packs and reduces in fp32: Σ⌈n/d⌉·4. After the reduction the gradients the update reads are fp32 when fp16's
loss scaler has unscaled them (new fp32 arrays) or they were reduced in fp32: ``final_gradients`` (4Ψ at
ZeRO 0, Σ⌈n/d⌉·4 under ZeRO), a temporary of the step (``core``), measured at the update.

Experts (``Model.experts``, ``Mesh.ep``): a rank holds its E/ep experts (each split over tp) and the
replicated router (h·E, no bias); its parameters, gradients and AdamW state are measured at pp 1, ZeRO 0
(and ZeRO 1-3 at ep 1: ZeRO with ep > 1 is not built, formula only), in float32, float64, bf16 and fp16 (fp32 masters and moments beside the 2-byte model, as for the dense
model: ``tests/test_plan_experts.py``).
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
    """{parameters, gradients, optimizer state[, master weights]: (bytes, source)} on one rank holding ``psi``
    parameters (``tensors``, in model order), d = the ranks its parameters are replicated over, ``dp_rank``
    its rank among them (ZeRO's padding leaves the last ranks fewer elements of state). Mixed precision
    (bf16/fp16): the model in 2 bytes, the fp32 masters apart ("master weights") from the two fp32 moments."""
    zero, e, g = choices.zero, ITEMSIZE[choices.precision], choices.grad_itemsize
    mixed = choices.mixed
    moment = 4 if mixed else e  # AdamW's moments: fp32 beside a 2-byte model (the master dtype), else e
    K = choices.optimizer_buffers * moment
    paper = "Rajbhandari et al. 2020 §5.1" + (", mixed precision" if mixed else "")
    states = {"parameters": (psi * e, f"Ψ·e ({'the model in ' + choices.precision if mixed else 'one dtype'}), {paper}"),
              "gradients": (psi * e, "Ψ·e: .grad in the parameters' dtype, whole at the end of backward "
                                     "(before its reduction)")}
    if zero == 0:
        states["optimizer state"] = (psi * K, f"AdamW's 2 moments: 2Ψ·{moment} (nn.AdamW{', fp32' if mixed else ''})")
        if mixed:
            states["master weights"] = (4 * psi, "4Ψ: an fp32 copy of every parameter "
                                                 "(minitp.nn.master_weights.MasterWeights)")
        return states
    groups = sharded_groups(tensors, choices, d)
    what = "unit" if zero == 3 else "bucket"
    mine = zero1_elements(groups, d, dp_rank)
    module = f"minitp.parallel.data.zero{'3' if zero == 3 else ''}"
    states["optimizer state"] = (mine * K, f"ZeRO-{zero} over the padded {what}s: 2·{moment}·|[r⌈n/d⌉, (r+1)⌈n/d⌉) "
                                           f"∩ [0, n)| per {what} ({module}; {paper}: KΨ/N_d)")
    if mixed:
        states["master weights"] = (mine * 4, f"ZeRO-{zero}: the fp32 master of this rank's slice only, "
                                              f"4·|[r⌈n/d⌉, (r+1)⌈n/d⌉) ∩ [0, n)| per {what} (optimizer state "
                                              f"\"master\", {module}, master_dtype; {paper}: 4Ψ/N_d)")
    if zero >= 2:
        # ZeRO-2 reduces the tied table's bucket (the last) only after backward, once the two ends have summed
        # it (parallel.data.buckets): its whole gradient is alive then, not a slice (measured, pp × cp)
        tied = sum(tensor.elements for tensor in tensors if tensor.tied) if zero == 2 else 0
        states["gradients"] = (padded_slices(groups[:-1] if tied else groups, d) * g + tied * e,
                               f"ZeRO-{zero}: Σ⌈n/d⌉·{g}, this rank's reduce-scattered slice of each {what}"
                               f"{' (reduced in fp32)' if g != e else ''}"
                               f"{' but the tied table, whole (n·e) until the two ends have summed it' if tied else ''}"
                               f" ({paper} §5.2: Ψe/N_d)")
    if zero == 3:
        states["parameters"] = (padded_slices(groups, d) * e + e,
                                "ZeRO-3: Σ_u⌈n_u/d⌉·e + e, this rank's slice of each unit and the freed "
                                "parameters' one-element placeholder (Rajbhandari et al. 2020 §5.3: Ψe/N_d)")
    return states


def final_gradients(psi, tensors, d, choices):
    """Bytes of the fp32 gradients the update reads, when they are fp32 in a mixed-precision step: fp16's
    loss scaler unscales them into new fp32 arrays (``DynamicLossScaler.unscale``), and ``grad_reduce="fp32"``
    leaves them reduced in fp32. ZeRO 0: every gradient, 4Ψ; ZeRO 1-3: this rank's slices, Σ⌈n/d⌉·4. None
    when they stay in the model's dtype (bf16 reduced in bf16, no scaler) or the model is float32/float64.
    Alive from the reduction (or the unscaling) to the next step's ``zero_grad``: at the update, beside (while
    they are made) the 2-byte gradients they come from."""
    if not choices.mixed or (choices.precision != "fp16" and choices.grad_reduce != "fp32"):
        return None
    if choices.zero == 0:
        return 4 * psi
    return 4 * padded_slices(sharded_groups(tensors, choices, d), d)
