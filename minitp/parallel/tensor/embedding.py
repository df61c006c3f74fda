"""The embedding table split by vocabulary: each rank holds a range of rows (Megatron-LM's
``VocabParallelEmbedding``, Shoeybi et al. 2019, section 3).

With t ranks and a (V, h) table, rank r holds rows [r·V/t, (r+1)·V/t): the tokens of its vocabulary
range. A lookup is then a sum over ranks: every id lies in exactly one range, so if each rank returns
its row for the ids it owns and zeros for the others, the sum of the ranks' (s, b, h) outputs is the
serial lookup. That sum is the only communication -- f̄'s all-reduce, or with sequence parallelism ḡ's
reduce-scatter -- and the table itself never crosses the wire.

The same split serves the output layer: logits = X Eᵀ with E split by rows is a column-parallel GEMM
over the vocabulary, whose sharded logits go straight into ``vocab_parallel_cross_entropy``.
"""
import numpy

from minitp import backend, comm
from minitp import functional as F
from minitp.autograd import Function, Tensor
from minitp.functional.embeddings import add_rows
from minitp.nn.layers import Embedding
from minitp.parallel.tensor import mappings


def vocab_range(vocab_size, group):
    """(start, end): the ids [start, end) whose rows this rank of ``group`` holds, V/t of them.

    ``ValueError`` when t does not divide V -- on every rank, since each checks the same numbers."""
    per_rank = comm.divide(vocab_size, group.size, "the vocabulary size (rows split over tp)")
    return group.rank * per_rank, (group.rank + 1) * per_rank


class VocabRangeLookup(Function):
    """Rows of this rank's (V/t, h) block of the table for the ids in its range [start, start + V/t);
    a zero row for every other id. ids (s, b) -> (s, b, h).

    Forward: shift the ids into the block (id - start), clip the ones outside to a valid row so the
    gather cannot go out of bounds, then zero the rows looked up for them. Backward: the gradient of
    row j is the sum of the output gradients at the positions whose id is start + j (a scatter-add, as
    in the serial embedding); positions whose id another rank owns add nothing here -- their rows were
    zeroed, so they did not depend on this rank's weights. Saves only the ids (no new memory).
    """

    def forward(self, weight_shard, ids, start):
        xp = backend.array_module(weight_shard)
        self.save_for_backward(ids)
        self.start, self.weight_shape = start, weight_shard.shape
        local, outside = ids_in_range(ids, self.start, self.weight_shape[0], xp)
        rows = xp.take(weight_shard, local, axis=0)  # a new (s, b, h) array: zeroing it in place is safe
        rows[outside] = 0
        return rows

    def backward(self, grad):
        (ids,) = self.saved
        xp = backend.array_module(grad)
        local, outside = ids_in_range(ids, self.start, self.weight_shape[0], xp)
        inside = ~outside.reshape(-1)
        grad_weight = xp.zeros(self.weight_shape, dtype=grad.dtype)
        # only the positions whose id is in this rank's range reach its rows
        add_rows(grad_weight, local.reshape(-1)[inside], grad.reshape(-1, self.weight_shape[-1])[inside], xp)
        return grad_weight


def ids_in_range(ids, start, count, xp):
    """(the ids as rows of the block [start, start + count), clipped to row 0 where outside it; where they
    are outside: another rank owns those). Shared by the vocab-parallel embedding and cross-entropy."""
    local = ids - start
    outside = (local < 0) | (local >= count)
    return xp.where(outside, 0, local), outside


def vocab_range_lookup(ids, weight_shard, start):
    """This rank's partial embedding: rows of ``weight_shard`` for ids in [start, start + rows), zeros for
    the rest. See ``VocabRangeLookup``."""
    ids = backend.array_module(weight_shard.data).asarray(ids.data if isinstance(ids, Tensor) else ids)
    F.check_integer(ids, "embedding ids")
    return VocabRangeLookup.apply(weight_shard, ids=ids, start=start)


class VocabParallelEmbedding(Embedding):
    """An (V, h) embedding table split by rows over the tensor-parallel group: rank r holds the rows of
    ids [r·V/t, (r+1)·V/t) (``weight``: (V/t, h), ``split_axis=0``): only those rows of the serial
    ``nn.Embedding(V, h, seed=seed)`` are drawn, so the sharded layer starts from the serial layer's weights.

    Input: ids (s, b), the same on every rank. Each rank looks up the ids in its range and zeroes the
    others (``VocabRangeLookup``); the partial (s, b, h) embeddings then add up to the full lookup:

    - by default f̄ (all-reduce forward, identity backward): output replicated, (s, b, h). One s×b×h
      all-reduce crosses the wire forward; nothing backward (the gradient is already replicated).
    - with ``sequence_parallel=True``, ḡ (reduce-scatter along the sequence): output this rank's tokens
      (s/t, b, h), ready for the sequence-parallel dropout and LayerNorm that follow. The reduce-scatter
      sends half the all-reduce's ring bytes; backward all-gathers the (s/t, b, h) gradients.

    V must be divisible by t, and under sequence parallelism s by t: ``ValueError`` otherwise, on every
    rank, before any communication.
    """

    weight_split_axis = 0

    def __init__(self, num_embeddings, dim, *, group, sequence_parallel=False, dtype=numpy.float32, seed=0,
                 std=1.0, tag="embedding"):
        vocab_start, vocab_end = vocab_range(num_embeddings, group)
        super().__init__(num_embeddings, dim, dtype=dtype, seed=seed, std=std, shard=(group.rank, group.size))
        self.group, self.vocab_start, self.vocab_end = group, vocab_start, vocab_end
        self.sequence_parallel, self.tag = sequence_parallel, tag

    def forward(self, ids):
        # ids are the same on every rank: an id no rank owns would silently embed as zeros, so every rank
        # raises the same error here, before the collective
        ids = backend.array_module(self.weight.data).asarray(ids.data if isinstance(ids, Tensor) else ids)
        comm.agree_on_ids(self.group, f"{self.tag}: the token ids", ids)  # first: the checks below then agree
        F.check_indices(ids, self.num_embeddings, "embedding ids", "vocabulary size")
        if self.sequence_parallel:
            comm.divide(len(ids), self.group.size, "the sequence length (split over tp by sequence parallelism)")
        partial = vocab_range_lookup(ids, self.weight, self.vocab_start)  # (s, b, h), zeros outside the range
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(partial, self.group, self.tag)
        return mappings.reduce_from_tensor_parallel_region(partial, self.group, self.tag)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.dim} (rows {self.vocab_start}..{self.vocab_end - 1} on this rank), "
                f"sequence_parallel={self.sequence_parallel}")
