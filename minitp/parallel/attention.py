"""Head-parallel self-attention (Shoeybi et al. 2019, section 3, figure 3b).

Heads are independent between the QKV projection and the output projection, so rank r of t takes a/t
whole heads: the columns of ``qkv`` that produce them (column-parallel; the head-major column order of
``MultiHeadAttention`` makes them one contiguous block) and the rows of ``proj`` that read them
(row-parallel). The attention core -- scores, mask, softmax, dropout, the product with V -- runs on the
rank's heads with no communication. One all-reduce forward (after ``proj``) and one backward (before
``qkv``), each of an s×b×h tensor.
"""
import numpy

from minitp import dist
from minitp.nn import init
from minitp.nn.attention import MultiHeadAttention
from minitp.nn.layers import Dropout
from minitp.nn.module import Module
from minitp.nn.recompute import check_recompute
from minitp.parallel.layers import ColumnParallelLinear, RowParallelLinear
from minitp.parallel.sequence import SequenceParallelDropout


class ParallelAttention(MultiHeadAttention):
    """``MultiHeadAttention`` with its heads split over the tensor-parallel group.

    Shapes on rank r (a heads, d = h/a): X (s, b, h) replicated -- or (s/t, b, h) with
    ``sequence_parallel``, all-gathered by ``qkv`` -- -> qkv (s, b, 3h/t) = heads [r·a/t, (r+1)·a/t),
    each [q | k | v] -> attention core (b, a/t, s, s) -> context (s, b, h/t) -> proj, summed over ranks
    -> (s, b, h) replicated, or reduce-scattered to (s/t, b, h). The attention dropout draws the
    rank's heads' slice of the serial (b, a, s, s) mask (``heads_offset``).

    The forward is the serial module's: only the layers and the head count differ, and so is
    ``recompute="selective"``: the rank's heads' attention core is recomputed in backward (it holds no
    communication, so the re-run adds none).
    """

    def __init__(self, hidden, heads, causal=True, attention_dropout=0.0, dropout=0.0, seed=0,
                 dtype=numpy.float32, sequence_parallel=False, group=None, recompute=None):
        Module.__init__(self)  # MultiHeadAttention's forward, with these layers instead of its own
        group = dist.tensor_parallel_group(group)
        if heads < 1 or hidden % heads:
            raise ValueError(f"heads ({heads}) must divide hidden ({hidden})")
        self.recompute = check_recompute(recompute, (None, "selective"), type(self).__name__)
        self.heads = dist.divide(heads, group.size, "heads (whole heads per tensor-parallel rank)")
        self.heads_offset, self.heads_total = group.rank * self.heads, heads
        self.hidden, self.head_dim, self.causal, self.group = hidden, hidden // heads, causal, group
        self.qkv = ColumnParallelLinear(hidden, 3 * hidden, sequence_parallel=sequence_parallel, group=group,
                                        dtype=dtype, seed=init.derive_seed(seed, "qkv"), tag="attention qkv")
        self.attention_dropout = Dropout(attention_dropout, seed=init.derive_seed(seed, "attention_dropout"),
                                         batch_axis=0)  # probabilities are (b, a, s, s)
        self.proj = RowParallelLinear(hidden, hidden, input_is_parallel=True, sequence_parallel=sequence_parallel,
                                      group=group, dtype=dtype, seed=init.derive_seed(seed, "proj"),
                                      tag="attention proj")
        dropout_seed = init.derive_seed(seed, "dropout")
        self.dropout = (SequenceParallelDropout(dropout, dropout_seed, group) if sequence_parallel
                        else Dropout(dropout, dropout_seed))