"""DeepSpeed-Ulysses (Jacobs et al. 2023): context parallelism that moves the heads instead of the keys.

Attention mixes tokens but never heads. So give each of the cp ranks every token of a/cp heads, run the
ordinary attention core there, and give the tokens back:

    q, k, v (b, a, s/cp, d)  --all-to-all: split heads, gather the sequence-->  (b, a/cp, s, d)
    attention (dense or blockwise; causal mask, dropout: all s tokens of a/cp heads, as serially)
    out (b, a/cp, s, d)      --all-to-all: split the sequence, gather heads-->  (b, a, s/cp, d)

Each rank sends (cp - 1)/cp of what it holds in each all-to-all: q, k and v (one all-to-all of the
three stacked) and the output forward, their gradients backward, so per rank and per layer

    forward  4 (cp - 1)/cp · (s/cp)·b·h·e        backward  the same

with h = a·d the hidden size of the rank's heads -- against ring attention's 2(cp - 1)·(s/cp)·b·h·e
forward, which does not shrink with cp: Ulysses sends 2/cp of the ring's bytes. Its limit is the other
way round: at most a (the heads) ranks, a/tp per tensor-parallel rank, and cp must divide them
(``ValueError`` on every rank otherwise, before any communication).

The tokens must be a contiguous block per rank (the gathered sequence is the blocks in rank order):
Ulysses needs no zigzag, since every rank attends all s queries of its heads -- the same work.
"""
from minitp import comm
from minitp import functional as F
from minitp.autograd import Function
from minitp.functional import attention
from minitp.parallel.tensor import mappings

BATCH, HEADS, SEQUENCE = 0, 1, 2  # of (b, a, s, d)


class AllToAll(Function):
    """All-to-all forward (split ``split_axis``, gather ``concat_axis``), the reverse all-to-all backward.

    The forward is a permutation of the ranks' numbers, so its backward is the inverse permutation:
    block j of the gradient goes back to rank j, the axes swapped (the same bytes each way)."""

    def forward(self, x, group, split_axis, concat_axis, tag):
        self.group, self.split_axis, self.concat_axis, self.tag = group, split_axis, concat_axis, tag
        return comm.all_to_all(x, group, split_axis, concat_axis, tag=mappings.tag(tag, "all-to-all forward"))

    def backward(self, grad):
        return comm.all_to_all(grad, self.group, self.concat_axis, self.split_axis,
                               tag=mappings.tag(self.tag, "all-to-all backward"))


def all_to_all(x, group, split_axis, concat_axis, tag=None):
    """Differentiable ``comm.all_to_all``: see ``AllToAll``."""
    return AllToAll.apply(x, group=group, split_axis=split_axis, concat_axis=concat_axis, tag=tag)


def ulysses_attention(q, k, v, group, causal=True, dropout=None, tag="attention"):
    """Self-attention of this rank's s/cp tokens, (b, a, s/cp, d) each, over ``group`` (``mesh.cp``):
    all-to-all to (b, a/cp, s, d), the serial core, all-to-all back. Returns (b, a, s/cp, d).

    ``dropout``: the attention ``Dropout``, whose ``splits`` must place this rank's a/cp heads (the
    builder adds ``(1, cp_rank, cp)`` after tensor parallelism's head split).
    """
    comm.divide(q.shape[HEADS], group.size, "the heads of a tensor-parallel rank (split over cp by Ulysses)")
    # (3, b, a, s/cp, d): q, k, v cross the wire in one all-to-all
    stacked = all_to_all(F.stack([q, k, v]), group, split_axis=1 + HEADS, concat_axis=1 + SEQUENCE,
                         tag=mappings.tag(tag, "Ulysses q,k,v"))
    q, k, v = (F.reshape(part, part.shape[1:]) for part in F.split(stacked, 3, axis=0))
    out = attention(q, k, v, causal, dropout)  # (b, a/cp, s, d): every token, a/cp heads, dense or blockwise
    return all_to_all(out, group, split_axis=SEQUENCE, concat_axis=HEADS, tag=mappings.tag(tag, "Ulysses output"))
