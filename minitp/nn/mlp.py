"""The transformer's MLP block: h -> ffn -> h with a GeLU between, then the residual dropout.

In the paper's notation (Shoeybi et al. 2019, section 3): Y = GeLU(XA), Z = Dropout(YB), with A = ``fc1``
(h x ffn) and B = ``fc2`` (ffn x h). Tensor parallelism splits A by columns and B by rows, so that the
GeLU is applied to a rank's own columns and no communication sits between the two GEMMs.
"""
import numpy

from minitp.nn import init
from minitp.nn.layers import GELU, Dropout, Linear
from minitp.nn.module import Module


class MLP(Module):
    """(s, b, h) -> (s, b, h): ``fc1`` (A), GeLU, ``fc2`` (B), ``dropout`` (the block's residual dropout).

    ``ffn_hidden`` defaults to 4 * hidden, as in GPT-2 and Megatron.
    """

    def __init__(self, hidden, ffn_hidden=None, dropout=0.0, seed=0, dtype=numpy.float32, approximate="tanh"):
        super().__init__()
        ffn_hidden = 4 * hidden if ffn_hidden is None else ffn_hidden
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.fc1 = Linear(hidden, ffn_hidden, dtype=dtype, seed=init.derive_seed(seed, "fc1"))
        self.gelu = GELU(approximate)
        self.fc2 = Linear(ffn_hidden, hidden, dtype=dtype, seed=init.derive_seed(seed, "fc2"))
        self.dropout = Dropout(dropout, seed=init.derive_seed(seed, "dropout"))

    def forward(self, x):
        # (s, b, h) @ (h, ffn) = (s, b, ffn) -> GeLU -> (s, b, ffn) @ (ffn, h) = (s, b, h)
        return self.dropout(self.fc2(self.gelu(self.fc1(x))))

    def extra_repr(self):
        return f"{self.hidden}, ffn_hidden={self.ffn_hidden}"
