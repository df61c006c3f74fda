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
from minitp.parallel.builders import TensorParallelLayers


class ParallelTransformerBlock(TransformerBlock):
    """``TransformerBlock`` built with ``TensorParallelLayers``: input and output (s, b, h) replicated, or
    (s/t, b, h) -- rank r's tokens [r·s/t, (r+1)·s/t) -- with ``sequence_parallel``.

    ``recompute`` as in ``TransformerBlock``. ``"full"`` re-runs the layer in backward, its collectives
    included: two more all-reduces (or all-gather + reduce-scatter pairs) per layer.
    """

    def __init__(self, hidden, heads, ffn_hidden=None, *, group, sequence_parallel=False, data_parallel=None,
                 **options):
        super().__init__(hidden, heads, ffn_hidden,
                         layers=TensorParallelLayers(group, sequence_parallel, data_parallel), **options)
        self.group = group
        self.sequence_parallel = sequence_parallel
