"""Context parallelism: the whole model's activations split along the sequence over the cp ranks.

Sequence parallelism splits only LayerNorm and dropout along the sequence, and gathers it again for
every GEMM. Context parallelism keeps it split everywhere: cp rank c holds s/cp tokens of every
activation of every layer, so the activations of a long sequence fit. Everything a transformer does is
token by token -- embeddings, LayerNorm, the GEMMs, GeLU, dropout, the loss -- except attention, where a
query meets every earlier key. That is the one place cp ranks talk, in one of two ways:

    kind        which tokens rank c holds         how attention sees every key
    "ring"      block c of cp                      K, V travel the ring (``ring_attention``)
    "zigzag"    chunks c and 2cp-1-c of 2·cp       the same ring, the causal work balanced
    "ulysses"   block c of cp                      all-to-all to a/cp heads × all s tokens (``ulysses``)

``ContextParallelLayers`` is ``TensorParallelLayers`` with the sequence split once more, outermost:

    role               what changes under cp
    tokens             the rank's s/cp tokens of the ids and targets (in its placement's order)
    positions          those tokens' positions in wpe (replicated; its gradient summed over dp × cp,
                       ``sync.all_reduce_gradients``, like every parameter's)
    dropout            the mask at the rank's tokens: splits ``(0, cp_rank, cp[, "zigzag"])``, then SP's
    attention_core     ring attention or Ulysses over ``mesh.cp``
    attention_dropout  Ulysses: the rank's a/cp heads of its tp heads; ring: placed block by block
    cross_entropy      the mean over the rank's tokens (the mean over dp × cp ranks is the global mean)

Under SP as well, tp splits the rank's s/cp tokens further: s/(cp·t) per rank between the GEMMs.
"""
import math

from minitp import backend, comm
from minitp.nn import placement
from minitp.parallel.tensor.builders import SEQUENCE_AXIS, TensorParallelLayers
from minitp.parallel.context.ring import ring_attention
from minitp.parallel.context.ulysses import ulysses_attention

KINDS = ("ring", "zigzag", "ulysses")
HEADS_AXIS = 1  # of attention's (b, a, s, s) probabilities


class ContextParallelLayers(TensorParallelLayers):
    """The layers of a model whose sequence is split over ``context`` (``mesh.cp``) by ``kind`` (one of
    ``KINDS``), tensor-parallel over ``group`` (``mesh.tp``), optionally sequence-parallel, its batch
    split over ``data_parallel`` (``mesh.dp``)."""

    def __init__(self, group, context, kind, sequence_parallel=False, data_parallel=None, overlap=False, seq_len=None):
        if kind not in KINDS:
            raise ValueError(f"context parallelism is one of {KINDS}, not {kind!r}")
        super().__init__(group, sequence_parallel, data_parallel, overlap, seq_len)
        self.context, self.kind = context, kind
        self.layout = placement.ZIGZAG if kind == "zigzag" else placement.CONTIGUOUS

    def sequence_splits(self):
        """cp first (the rank's s/cp tokens), then SP's tp block of those."""
        return ((SEQUENCE_AXIS, self.context.rank, self.context.size, self.layout),) + super().sequence_splits()

    def split_sequence(self, seq):
        """The global positions of this cp rank's tokens, in its order; ``ValueError`` (on every rank: the
        same numbers) when ``seq`` does not split over cp, or its s/cp tokens over tp under SP."""
        cp = self.context.size
        try:
            placement.runs(self.context.rank, cp, seq, self.layout)
        except ValueError as error:
            raise ValueError(f"the sequence length s={seq} under {self.kind} context parallelism over cp={cp}: "
                             f"{error}") from None
        if self.sequence_parallel:
            comm.divide(seq // cp, self.group.size, "the tokens of a cp rank (s/cp, split over tp by sequence parallelism)")
        return placement.positions([(self.context.rank, cp, self.layout)], seq // cp)[1]

    def tokens(self, ids):
        """The (s/cp, b) ids or targets of this rank's tokens, in its placement's order."""
        return ids[backend.array_module(ids).asarray(self.split_sequence(len(ids)))]

    def tokens_here(self, seq):
        self.split_sequence(seq)
        return super().tokens_here(seq // self.context.size)

    def attention_dropout(self, p, seed):
        """(b, a, s, s): under Ulysses the rank's a/cp heads of its tp heads; ring attention places its
        (query, key) blocks itself."""
        dropout = super().attention_dropout(p, seed)
        if self.kind == "ulysses" and self.context.size > 1:
            dropout.splits += ((HEADS_AXIS, self.context.rank, self.context.size),)
        return dropout

    def attention_core(self, q, k, v, causal, dropout):
        """q, k, v (b, a/t, s/cp, d), this rank's tokens -> the same rows of the attention output."""
        if self.kind == "ulysses":
            return ulysses_attention(q, k, v, self.context, causal, dropout)
        # ring attention draws the dropout mask block by block (Dropout.block_drawer: microbatches too)
        return ring_attention(q, k, v, self.context, self.layout, causal, dropout)

    def sequence_multiple(self):
        """cp (2·cp for zigzag), and cp·t under SP."""
        chunks = self.context.size * (2 if self.layout == placement.ZIGZAG else 1)
        return math.lcm(chunks, self.context.size * super().sequence_multiple())

    def logits_at(self, logits, position):
        """Global ``position``'s (b, V/t) logits, on every cp rank: the rank holding that token broadcasts
        its row over cp."""
        seq = len(logits) * self.context.size
        owner = next(c for c in range(self.context.size)
                     if any(start <= position < stop for start, stop in placement.runs(c, self.context.size, seq, self.layout)))
        row = 0
        if owner == self.context.rank:
            row = list(self.split_sequence(seq)).index(position)
        return comm.broadcast(logits[row], self.context, root=owner, tag="generate: the last token's logits")


def context_layers(mesh, context_parallel, sequence_parallel, heads, overlap=False, seq_len=None):
    """The layers of a ``ParallelGPT`` on ``mesh``: ``TensorParallelLayers`` without context parallelism
    (``context_parallel=None``, which needs cp = 1), else ``ContextParallelLayers`` of that kind.

    ``ValueError`` on every rank, before any layer is built: a cp > 1 mesh without a kind, an unknown
    kind, heads that tp × cp does not divide under Ulysses."""
    if context_parallel is None:
        if mesh.cp_size > 1:
            raise ValueError(f"the mesh splits the sequence over cp={mesh.cp_size} ranks: say how attention "
                             f"crosses them, context_parallel= one of {KINDS}")
        return TensorParallelLayers(mesh.tp, sequence_parallel, mesh.dp, overlap, seq_len)
    if context_parallel not in KINDS:
        raise ValueError(f"context_parallel must be one of {KINDS} (or None), not {context_parallel!r}")
    if context_parallel == "ulysses":
        comm.divide(heads, mesh.tp_size * mesh.cp_size, "the heads (split over tp × cp by Ulysses)")
    return ContextParallelLayers(mesh.tp, mesh.cp, context_parallel, sequence_parallel, mesh.dp, overlap, seq_len)
