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
import numpy

from minitp import dist
from minitp.nn import init
from minitp.nn.layers import LayerNorm
from minitp.nn.module import Module
from minitp.nn.recompute import RECOMPUTE_CHOICES, check_recompute
from minitp.nn.transformer import TransformerBlock
from minitp.parallel.attention import ParallelAttention
from minitp.parallel.mlp import ParallelMLP
from minitp.parallel.sequence import SequenceParallelLayerNorm


class ParallelTransformerBlock(TransformerBlock):
    """``TransformerBlock`` over the tensor-parallel group; input and output (s, b, h) replicated, or
    (s/t, b, h) -- rank r's tokens [r·s/t, (r+1)·s/t) -- with ``sequence_parallel``.

    With ``sequence_parallel`` the full sequence is cut where it enters the sequence-parallel region
    (``scatter_to_sequence_parallel_region``): a length not divisible by t raises the same ValueError
    on every rank there, before any communication.

    ``recompute`` as in ``TransformerBlock``. ``"full"`` re-runs the layer in backward, its collectives
    included: two more all-reduces (or all-gather + reduce-scatter pairs) per layer.
    """

    def __init__(self, hidden, heads, ffn_hidden=None, causal=True, dropout=0.0, attention_dropout=0.0,
                 seed=0, dtype=numpy.float32, sequence_parallel=False, group=None, recompute=None):
        Module.__init__(self)  # TransformerBlock's forward, with these layers
        self.recompute = check_recompute(recompute, RECOMPUTE_CHOICES, type(self).__name__)
        group = dist.tensor_parallel_group(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.ln1 = SequenceParallelLayerNorm(hidden, group=group, dtype=dtype, tag="ln1") if sequence_parallel \
            else LayerNorm(hidden, dtype=dtype)
        self.attention = ParallelAttention(hidden, heads, causal=causal, attention_dropout=attention_dropout,
                                           dropout=dropout, seed=init.derive_seed(seed, "attention"), dtype=dtype,
                                           sequence_parallel=sequence_parallel, group=group,
                                           recompute="selective" if recompute == "selective" else None)
        self.ln2 = SequenceParallelLayerNorm(hidden, group=group, dtype=dtype, tag="ln2") if sequence_parallel \
            else LayerNorm(hidden, dtype=dtype)
        self.mlp = ParallelMLP(hidden, ffn_hidden, dropout=dropout, seed=init.derive_seed(seed, "mlp"), dtype=dtype,
                               sequence_parallel=sequence_parallel, group=group)
