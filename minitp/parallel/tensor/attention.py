"""Head-parallel self-attention (Shoeybi et al. 2019, section 3): each rank computes whole heads."""
from minitp.nn.attention import MultiHeadAttention
from minitp.parallel.tensor.builders import TensorParallelLayers


class ParallelAttention(MultiHeadAttention):
    """``MultiHeadAttention`` with its a heads split over the t ranks of ``group``: rank r computes heads
    [r·a/t, (r+1)·a/t).

    qkv is column-parallel: rank r holds the qkv columns of its heads -- a contiguous block, thanks to the
    head-major layout -- so it gets each of its heads' q, k and v with no communication beyond f (or g
    under sequence parallelism). The attention core of its heads needs nothing from other ranks. proj is
    row-parallel: its rows are the rank's heads' output features, so Y_r = context_r proj_r is a partial
    sum, all-reduced by f̄ (or reduce-scattered by ḡ under SP)::

        x (s, b, h) -> f -> qkv_r: (s, b, 3h/t) -> a/t heads' softmax(q kᵀ/√d) v -> proj_r -> f̄
          -> (s, b, h) replicated, or reduce-scattered to (s/t, b, h)

    The attention dropout draws the rank's heads' slice of the serial (b, a, s, s) mask (its ``splits``).
    This is ``MultiHeadAttention`` built with ``TensorParallelLayers``: the forward is the serial one, and
    so is ``recompute="selective"`` (the rank's heads' core holds no communication, so the re-run adds none).
    """

    def __init__(self, hidden, heads, *, group, sequence_parallel=False, data_parallel=None, **options):
        super().__init__(hidden, heads, layers=TensorParallelLayers(group, sequence_parallel, data_parallel),
                         **options)
        self.group = group
