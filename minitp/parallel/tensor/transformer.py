"""The GPT-2 transformer layer with tensor parallelism, and optionally sequence parallelism.

``sequence_parallel=False`` (Shoeybi et al. 2019): attention and MLP are split over the t ranks; the
LayerNorms, dropouts and residual additions are replicated (every rank holds (s, b, h)). Two
all-reduces forward (f̄ after attention and after the MLP) and two backward (f before each).

``sequence_parallel=True`` (Korthikanti et al. 2022): between the attention and MLP blocks the
activations are split along the sequence, (s/t, b, h) per rank, so the LayerNorms, dropouts and
residuals keep 1/t of their activations. Each all-reduce becomes an all-gather (g, entering a
tensor-parallel layer) plus a reduce-scatter (ḡ, leaving it): the same ring bytes.

    x (s/t, b, h) -> LN -> g -> attention (heads split) -> ḡ -> dropout -> + x
                  -> LN -> g -> MLP (ffn split)         -> ḡ -> dropout -> +
"""
from minitp.nn.transformer import TransformerBlock
from minitp.parallel.tensor.builders import TensorParallelLayers
from minitp.parallel.tensor.mappings import check_sequence_block


class ParallelTransformerBlock(TransformerBlock):
    """``TransformerBlock`` built with ``TensorParallelLayers``: input and output (s, b, h) replicated, or
    (s/t, b, h) -- rank r's tokens [r·s/t, (r+1)·s/t) -- with ``sequence_parallel``.

    ``recompute`` as in ``TransformerBlock``. ``"full"`` re-runs the layer in backward, its collectives
    included: two more all-reduces (or all-gather + reduce-scatter pairs) per layer.

    ``seq_len``: the longest sequence the block will be run on (the model's context). Under SP a block
    told it refuses, on every rank and before any collective, an input of more than seq_len/t tokens:
    the full (s, b, h) sequence fed where the rank's (s/t, b, h) block belongs, which would otherwise
    return a result right on rank 0 and wrong on ranks 1..t-1, with no error. The check is local (one
    comparison, always on) and never refuses a valid block, since s <= seq_len. What it cannot see -- no
    ``seq_len``, or a full sequence of at most seq_len/t tokens, which looks exactly like a block -- only
    checked mode catches (``comm.init(checked=True)``: every rank passed the same array).
    """

    def __init__(self, hidden, heads, ffn_hidden=None, *, group, sequence_parallel=False, data_parallel=None,
                 seq_len=None, **options):
        super().__init__(hidden, heads, ffn_hidden,
                         layers=TensorParallelLayers(group, sequence_parallel, data_parallel, seq_len=seq_len),
                         **options)
        self.group = group
        self.sequence_parallel, self.seq_len = sequence_parallel, seq_len

    def forward(self, x):
        if self.sequence_parallel:  # the block's own name in the message; ln1 would refuse it next
            check_sequence_block(x, self.group, self.seq_len, "ParallelTransformerBlock (sequence-parallel input)")
        return super().forward(x)
