"""The transformer's MLP block: h -> ffn -> h with a GeLU between, then the residual dropout.

In the paper's notation (Shoeybi et al. 2019, section 3): Y = GeLU(XA), Z = Dropout(YB), with A = ``fc1``
(h x ffn) and B = ``fc2`` (ffn x h). Tensor parallelism splits A by columns and B by rows, so that the
GeLU is applied to a rank's own columns and no communication sits between the two GEMMs: build this
module with ``minitp.parallel.TensorParallelLayers`` and ``fc1`` is column-parallel (f enters it), ``fc2``
row-parallel (f̄ leaves it) -- ``minitp.parallel.ParallelMLP``.
"""
import numpy

from minitp.nn import init
from minitp.nn.builders import SERIAL
from minitp.nn.layers import GELU
from minitp.nn.module import Module


class MLP(Module):
    """(s, b, h) -> (s, b, h): ``fc1`` (A), GeLU, ``fc2`` (B), ``dropout`` (the block's residual dropout).

    ``ffn_hidden`` defaults to 4 * hidden, as in GPT-2 and Megatron. ``init_std``/``output_std``: GPT-2's
    N(0, std²) for fc1 and fc2 (None: torch's uniform). ``layers``: where the layers come from
    (``minitp.nn.builders``).
    """

    def __init__(self, hidden, ffn_hidden=None, dropout=0.0, seed=0, dtype=numpy.float32, approximate="tanh",
                 init_std=None, output_std=None, layers=SERIAL):
        super().__init__()
        ffn_hidden = 4 * hidden if ffn_hidden is None else ffn_hidden
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        layers.local(ffn_hidden, "ffn_hidden (fc1's columns, fc2's rows)")
        self.fc1 = layers.column_linear(hidden, ffn_hidden, dtype=dtype, seed=init.derive_seed(seed, "fc1"),
                                        std=init_std, tag="mlp fc1")
        self.gelu = GELU(approximate)
        self.fc2 = layers.row_linear(ffn_hidden, hidden, dtype=dtype, seed=init.derive_seed(seed, "fc2"),
                                     std=output_std, tag="mlp fc2")
        self.dropout = layers.dropout(dropout, init.derive_seed(seed, "dropout"))

    def forward(self, x):
        # (s, b, h) @ (h, ffn) = (s, b, ffn) -> GeLU -> (s, b, ffn) @ (ffn, h) = (s, b, h)
        # (on a tensor-parallel rank: ffn/t columns of fc1, ffn/t rows of fc2; see fc1 and fc2's forward)
        return self.dropout(self.fc2(self.gelu(self.fc1(x))))

    def extra_repr(self):
        return f"{self.hidden}, ffn_hidden={self.ffn_hidden}"
