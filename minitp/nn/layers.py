"""The basic layers: Linear, Embedding, LayerNorm, Dropout, GELU.

Each is a thin Module around one op of ``minitp.functional``: the op holds the math and its backward,
the layer holds the weights and the mode. Activations are (s, b, h), sequence first, as in the papers.
"""
import math

import numpy

from minitp import functional as F
from minitp.nn import init
from minitp.nn.module import Module, Parameter


class Linear(Module):
    """y = x @ W + b with W of shape (in_features, out_features): the paper's XA.

    Keeping W as (in, out) rather than torch's (out, in) makes Megatron's splits read as written:
    a column-parallel layer splits A by columns (the ``out`` axis, ``W[:, j0:j1]``), a row-parallel
    layer by rows (the ``in`` axis, ``W[i0:i1, :]``).

    Initialised as torch's ``nn.Linear``: W and b uniform in +-1/sqrt(in_features), drawn from ``rng``
    (or a generator seeded with ``seed``). The GPT re-initialises its layers GPT-2 style.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=numpy.float32, seed=0, rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        rng = init.rng_from(seed, rng)
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(init.uniform((in_features, out_features), bound, rng, dtype))
        self.bias = Parameter(init.uniform((out_features,), bound, rng, dtype)) if bias else None

    def forward(self, x):
        # (..., in) @ (in, out) = (..., out): one GEMM over every leading (s, b) position
        y = F.matmul(x, self.weight)
        return F.add(y, self.bias) if self.bias is not None else y

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Row ``i`` of a (num_embeddings, dim) table for each index ``i``: ids (s, b) -> (s, b, dim).

    Its backward scatters the incoming gradient rows back into the table (rows of ids that repeat add
    up); ids themselves get no gradient. Initialised N(0, 1) as in torch.
    """

    def __init__(self, num_embeddings, dim, dtype=numpy.float32, seed=0, rng=None):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter(init.normal((num_embeddings, dim), 1.0, init.rng_from(seed, rng), dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.dim}"


class LayerNorm(Module):
    """Normalise each token's h features to mean 0 and variance 1, then scale and shift:
    y = (x - mean) / sqrt(var + eps) * weight + bias, over the last axis only.

    Tokens do not see each other here: that is why sequence parallelism can split LayerNorm along s
    with no communication in forward (Korthikanti et al. 2022, section 4.2.2).
    """

    def __init__(self, hidden, eps=1e-5, dtype=numpy.float32):
        super().__init__()
        self.hidden, self.eps = hidden, eps
        self.weight = Parameter(init.ones((hidden,), dtype))
        self.bias = Parameter(init.zeros((hidden,), dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self):
        return f"{self.hidden}, eps={self.eps}"


class Dropout(Module):
    """Zero each element with probability ``p`` and scale the survivors by 1/(1-p) (training only).

    The mask is a pure function of (``seed``, ``counter``, the element's global index): ``counter``
    numbers this module's calls and advances by one per training call. A sharded copy of the model
    that starts from the same ``seed`` and ``counter`` and passes its block's place in the full tensor
    (``global_shape``, ``offset``) drops exactly the elements the serial model drops.

    Data parallelism cuts one more axis: a replica holds rows [``batch_offset``, ``batch_offset`` + b) of
    a global batch of ``batch_total`` (set by the model; ``None``: the batch is whole). ``batch_axis``
    says which axis of the input is the batch: 1 for (s, b, h) activations, 0 for attention's
    (b, a, s, s) probabilities.
    """

    def __init__(self, p=0.0, seed=0, batch_axis=1):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed, self.counter = p, seed, 0
        self.batch_axis, self.batch_offset, self.batch_total = batch_axis, 0, None

    def forward(self, x, global_shape=None, offset=None):
        if not self.training or self.p == 0:
            return x  # the identity: no mask drawn, the counter does not move
        if self.batch_total is not None:  # this replica's rows of the global batch's mask
            global_shape = list(x.shape if global_shape is None else global_shape)
            offset = list((0,) * x.ndim if offset is None else offset)
            global_shape[self.batch_axis] = self.batch_total
            offset[self.batch_axis] += self.batch_offset
        y = F.dropout(x, self.p, self.seed, self.counter, global_shape=global_shape, offset=offset)
        self.counter += 1
        return y

    def extra_repr(self):
        return f"p={self.p}, seed={self.seed}, counter={self.counter}"


class GELU(Module):
    """GeLU(x) = x * Phi(x); ``approximate="tanh"`` is GPT-2's 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))),
    ``"none"`` the exact form with erf."""

    def __init__(self, approximate="tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"
