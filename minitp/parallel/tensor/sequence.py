"""Sequence parallelism's own layers (Korthikanti et al. 2022, section 4.2.2): LayerNorm and dropout on
this rank's block of the sequence.

Tensor parallelism leaves LayerNorm, dropout and the residual additions replicated: every rank holds
the whole (s, b, h) tensor and does the same work on it. But these ops treat each token on its own --
LayerNorm normalises one token's h features, dropout and addition are elementwise -- so they can run
on s/t tokens per rank with no communication at all, and keep 1/t of their activations.
"""
import numpy

from minitp import functional as F
from minitp.nn.layers import Dropout, LayerNorm
from minitp.parallel.tensor import mappings


class SequenceParallelLayerNorm(LayerNorm):
    """LayerNorm of this rank's tokens, (s/t, b, h) -> (s/t, b, h); weight and bias replicated.

    Forward needs no communication: each token is normalised with its own mean and variance. Backward
    does: the weight and bias are shared by all s tokens, but each rank sees only s/t of them, so its
    dL/dweight is a partial sum over its tokens. The full gradient is the sum over ranks -- the weight
    is *used* on every rank, and the backward of a copy is a sum -- so weight and bias enter through f
    (identity forward, all-reduce backward). Forgetting this sum is the classic sequence-parallel bug:
    each rank would step its LayerNorm with 1/t of the gradient, and the replicas would drift apart.

    ``seq_len``: the longest sequence the model takes. Given, an input of more than seq_len/t tokens --
    the full sequence fed where this rank's block belongs -- is refused with a ``ValueError`` on every
    rank (``mappings.check_sequence_block``: local, always on). Without it, or for a full sequence of at
    most seq_len/t tokens, only checked mode catches that mistake (``checks.not_replicated``, at the g
    that follows in a block).
    """

    def __init__(self, hidden, eps=1e-5, *, group, dtype=numpy.float32, tag="layernorm", seq_len=None):
        super().__init__(hidden, eps=eps, dtype=dtype)
        self.group, self.tag, self.seq_len = group, tag, seq_len

    def forward(self, x):
        mappings.check_sequence_block(x, self.group, self.seq_len, f"SequenceParallelLayerNorm {self.tag!r}")
        weight = mappings.copy_to_tensor_parallel_region(self.weight, self.group, mappings.tag(self.tag, "weight"))
        bias = mappings.copy_to_tensor_parallel_region(self.bias, self.group, mappings.tag(self.tag, "bias"))
        return F.layer_norm(x, weight, bias, eps=self.eps)


class SequenceParallelDropout(Dropout):
    """Dropout of this rank's tokens, (s/t, b, h): the rank draws exactly its block of the serial mask.

    The mask is a function of (seed, counter, global index), so the rank only has to say where its block
    sits in the full tensor: block r of t along the sequence, rows [r·s/t, (r+1)·s/t) of (s, b, h)
    (``Dropout``'s ``splits``; more ``splits``, e.g. the data-parallel batch, may follow). No communication.
    """

    def __init__(self, p=0.0, seed=0, *, group, splits=()):
        super().__init__(p, seed, splits=((0, group.rank, group.size),) + tuple(splits))
        self.group = group
