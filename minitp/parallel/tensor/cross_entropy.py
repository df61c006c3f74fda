"""Cross-entropy on logits split by vocabulary: the loss from three all-reduces of one number per token,
never the s×b×V logits (Megatron-LM's ``vocab_parallel_cross_entropy``).

A column-parallel LM head leaves rank r with the logits of its vocabulary block, columns
[r·V/t, (r+1)·V/t). Gathering them would move s·b·V numbers -- the largest activation of a GPT, since
V (50257 for GPT-2) dwarfs h. This op computes the same loss from three all-reduces of s·b numbers each
(the max, the target logit, the sum of exponentials), and its backward needs no communication at all.

**Why it equals ordinary cross-entropy.** For one token with logits z over the vocabulary and target y:

    loss = log Σ_v exp(z_v) - z_y

1. The sum of exponentials is a sum over the vocabulary, and the ranks' blocks B_1 ... B_t are disjoint
   and cover it, so it splits into one partial sum per rank:

       Σ_v exp(z_v) = Σ_r Σ_{v in B_r} exp(z_v)        (an all-reduce SUM of the ranks' partial sums)

2. exp overflows for large logits, so every term is shifted by a constant m, which changes nothing:

       log Σ_v exp(z_v) = m + log Σ_v exp(z_v - m)     for any m

   The partial sums can only be added if every rank shifted by the same m, and nothing overflows if
   m >= every z_v: so m is the global max, max_r (max_{v in B_r} z_v), an all-reduce MAX. It is there
   for stability only: it cancels, loss = log Σ_v exp(z_v - m) - (z_y - m).

3. z_y lives on exactly one rank, the one whose block holds y. Every rank contributes its z_y - m if it
   owns y and 0 otherwise; an all-reduce SUM gives every rank the target logit.

**Backward.** ∂loss/∂z_v = softmax(z)_v - [v = y], with softmax(z)_v = exp(z_v - m) / Σ_u exp(z_u - m).
After step 1 every rank holds the full denominator, so it computes the softmax of its own columns; the
one-hot term is nonzero only in the owner's block. Each rank gets the gradient of exactly its logits
shard, which is what the column-parallel layer before it needs: no communication.
"""
from minitp import backend, comm
from minitp import functional as F
from minitp.autograd import Function, Tensor
from minitp.functional.precision import total
from minitp.parallel.tensor import mappings
from minitp.parallel.tensor.embedding import ids_in_range

_REDUCTIONS = ("mean", "sum", "none")


class VocabParallelCrossEntropy(Function):
    """Softmax cross-entropy of logits split by vocabulary: logits_shard (..., V/t), this rank's columns
    [r·V/t, (r+1)·V/t); targets (...), global ids, the same on every rank. The loss is replicated.

    Crosses the wire forward: three all-reduces of targets.size numbers (max, target logit, sum of
    exponentials); backward: nothing. Saves the softmax of this rank's columns (logits_shard-sized,
    as the serial op saves the full softmax) and the targets. See the module docstring for the math.
    """

    def forward(self, logits_shard, targets, group, reduction="mean", tag="cross-entropy"):
        xp = backend.array_module(logits_shard)
        vocab_per_rank = logits_shard.shape[-1]
        self.start, self.reduction = group.rank * vocab_per_rank, reduction
        positions = targets.shape          # one loss per token: s×b numbers in each all-reduce
        column = positions + (1,)          # the same numbers as a column beside the (..., V/t) logits

        # 1. m, the global max of each token's logits: the shift that keeps exp from overflowing
        local_max = logits_shard.max(axis=-1).reshape(positions)
        global_max = comm.all_reduce(local_max, group, tag=mappings.tag(tag, "max (all-reduce MAX)"),
                                     op="max").reshape(column)
        shifted = logits_shard - global_max  # <= 0 everywhere: exp cannot overflow

        # 2. z_y - m from the rank that owns y, zero from the others, summed
        local, outside = ids_in_range(targets, self.start, vocab_per_rank, xp)
        picked = xp.take_along_axis(shifted, local[..., None], axis=-1).reshape(positions)  # a new array
        picked[outside] = 0
        target_logit = comm.all_reduce(picked, group,
                                       tag=mappings.tag(tag, "target logit (all-reduce SUM)")).reshape(positions)

        # 3. Σ exp(z - m) over the whole vocabulary: the ranks' partial sums over their blocks, summed
        exps = xp.exp(shifted, out=shifted)  # in place: the shifted logits are not needed any more
        sum_exps = comm.all_reduce(total(exps, axis=-1).reshape(positions), group,
                                   tag=mappings.tag(tag, "sum of exponentials (all-reduce SUM)")).reshape(positions)

        losses = xp.log(sum_exps) - target_logit  # log Σ exp(z - m) - (z_y - m): m cancels
        if self.needs_input_grad[0]:
            exps /= sum_exps.reshape(column)  # now this rank's columns of the softmax
            self.save_for_backward(exps, targets)
        return F.reduce_loss(losses, reduction)

    def backward(self, grad):
        probs, targets = self.saved
        xp = backend.array_module(probs)
        vocab_per_rank = probs.shape[-1]
        # softmax - onehot on this rank's columns; the one-hot's 1 only where this rank owns the target.
        # Written into the saved softmax (the engine drops it after backward), as the serial op does.
        local, outside = ids_in_range(targets, self.start, vocab_per_rank, xp)
        inside = ~outside.reshape(-1)
        grad_logits = probs.reshape(-1, vocab_per_rank)
        grad_logits[xp.arange(grad_logits.shape[0])[inside], local.reshape(-1)[inside]] -= 1
        return F.reduce_loss_backward(grad_logits.reshape(probs.shape), grad, self.reduction)


def vocab_parallel_cross_entropy(logits_shard, targets, group, reduction="mean", tag="cross-entropy"):
    """Softmax cross-entropy of vocabulary-split logits against global integer targets, without
    gathering the logits.

    ``logits_shard`` (..., V/t): this rank's vocabulary columns, e.g. a column-parallel LM head's output
    without ``gather_output``. ``targets`` (...): ids in [0, V), the same on every rank. ``reduction``:
    "mean" (over the tokens), "sum" or "none" (one loss per token). Returns the same loss on every rank,
    equal to ``F.cross_entropy`` on the gathered logits. See ``VocabParallelCrossEntropy``.
    """
    # Every check reads numbers that are the same on every rank: all raise together, before any collective.
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    xp = backend.array_module(logits_shard.data)
    targets = xp.asarray(targets.data if isinstance(targets, Tensor) else targets)
    comm.agree_on_ids(group, f"{tag}: the targets", targets)  # first: every check below then agrees too
    F.check_integer(targets, "cross_entropy targets")
    if targets.shape != logits_shard.shape[:-1]:
        raise ValueError(f"targets of shape {targets.shape} for logits of shape {logits_shard.shape}")
    # serially a target out of range is an error; here one that no rank owns would silently lose its z_y
    F.check_indices(targets, logits_shard.shape[-1] * group.size, "cross_entropy targets", "vocabulary size")
    return VocabParallelCrossEntropy.apply(logits_shard, targets=targets, group=group, reduction=reduction, tag=tag)
