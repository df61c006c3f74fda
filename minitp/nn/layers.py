"""The basic layers: Linear, Embedding, LayerNorm, Dropout, GELU.

Each is a thin Module around one op of ``minitp.functional``: the op holds the math and its backward,
the layer holds the weights and the mode. Activations are (s, b, h), sequence first, as in the papers.
"""
import math

import numpy

from minitp import functional as F
from minitp import rng
from minitp.nn import init, placement
from minitp.nn.module import Module, Parameter


class Linear(Module):
    """y = x @ W + b with W of shape (in_features, out_features): the paper's XA.

    Keeping W as (in, out) rather than torch's (out, in) makes Megatron's splits read as written:
    a column-parallel layer splits A by columns (the ``out`` axis, ``W[:, j0:j1]``), a row-parallel
    layer by rows (the ``in`` axis, ``W[i0:i1, :]``).

    Initialised as torch's ``nn.Linear`` (W and b uniform in ±1/sqrt(in_features)), or with ``std``
    GPT-2's way (W ~ N(0, std²), b = 0); every value a pure function of (``seed``, its name, its index),
    ``minitp.nn.init``.

    The tensor-parallel layers are this class with ``weight_split_axis``/``bias_split_axis`` set and
    ``shard=(index, parts)``, the rank's block of the split axes: they draw only that block of the
    serial layer's weights. Serially ``shard=(0, 1)``: the whole.
    """

    weight_split_axis = bias_split_axis = None  # serially nothing is split

    def __init__(self, in_features, out_features, bias=True, dtype=numpy.float32, seed=0, std=None, shard=(0, 1)):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        place = dict(index=shard[0], parts=shard[1])
        weight_seed, bias_seed = init.derive_seed(seed, "weight"), init.derive_seed(seed, "bias")
        if std is None:
            bound = 1 / math.sqrt(in_features)
            weight = init.uniform((in_features, out_features), bound, weight_seed, dtype,
                                  axis=self.weight_split_axis, **place)
        else:
            weight = init.normal((in_features, out_features), std, weight_seed, dtype,
                                 axis=self.weight_split_axis, **place)
        self.weight = init.parameter(weight, self.weight_split_axis)
        self.bias = None
        if bias:
            bias_shape, _ = init.block((out_features,), self.bias_split_axis, **place)
            data = (init.zeros(bias_shape, dtype) if std is not None else
                    init.uniform((out_features,), bound, bias_seed, dtype, axis=self.bias_split_axis, **place))
            self.bias = init.parameter(data, self.bias_split_axis)

    def forward(self, x):
        # (..., in) @ (in, out) = (..., out): one GEMM over every leading (s, b) position, the bias added
        # into its output in place
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Row ``i`` of a (num_embeddings, dim) table for each index ``i``: ids (s, b) -> (s, b, dim).

    Its backward scatters the incoming gradient rows back into the table (rows of ids that repeat add
    up); ids themselves get no gradient. Initialised N(0, std²), std 1 as in torch; ``seed`` and ``shard``
    as in ``Linear``. ``VocabParallelEmbedding`` splits the rows (``weight_split_axis = 0``).
    """

    weight_split_axis = None

    def __init__(self, num_embeddings, dim, dtype=numpy.float32, seed=0, std=1.0, shard=(0, 1)):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = init.parameter(
            init.normal((num_embeddings, dim), std, init.derive_seed(seed, "weight"), dtype,
                        axis=self.weight_split_axis, index=shard[0], parts=shard[1]),
            self.weight_split_axis)

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
    numbers this module's calls and advances by one per training call.

    **Where this rank's block sits: one mechanism, ``splits``.** A parallel model hands each rank a
    block of the serial tensor; to drop exactly the elements the serial model drops, the rank draws
    the mask at its block's global indices. ``splits`` lists how the input is cut, as
    ``(axis, index, parts)``: "along ``axis`` this is block ``index`` of ``parts`` equal blocks". For
    example sequence parallelism is ``(0, tp_rank, tp)`` on (s, b, h), head parallelism ``(1, tp_rank, tp)``
    on attention's (b, a, s, s) probabilities, data parallelism ``(1, dp_rank, dp)`` on (s, b, h), context
    parallelism's zigzag ``(0, cp_rank, cp, "zigzag")``; entries on one axis nest, outermost first: block
    ``index`` of the block the entries before it describe (``minitp.nn.placement``). Empty serially: the
    input is the whole tensor.

    **Microbatches** (gradient accumulation, pipeline schedules). The serial model calls each dropout
    once per step on the whole batch. Run as m microbatches -- m calls on m blocks of the batch axis --
    the step must still draw that one call's mask, block by block. So ``microbatch = (index, m)`` (set
    by ``minitp.nn.microbatch.microbatch``, default ``(0, 1)``) adds the innermost split
    ``(batch_axis, index, m)``, and the counter advances on the call of the LAST microbatch only: every
    microbatch of a step draws with the step's counter, and the next step draws with the next one.
    (The alternative, rewinding counters after every microbatch, needs a caller that knows every
    dropout; here each call says which block it is, which recompute can save and replay.) The rule
    asks that microbatch m-1 runs last, as it does in every schedule of ``minitp.pipeline``.
    ``batch_axis``: where the batch lies in this dropout's input (1 for (s, b, h), 0 for attention's
    (b, a, s, s)); ``None`` refuses microbatches.
    """

    def __init__(self, p=0.0, seed=0, splits=(), batch_axis=None):
        super().__init__()
        rng.check_probability(p)
        self.p, self.seed, self.counter = p, seed, 0
        self.splits, self.batch_axis, self.microbatch = tuple(splits), batch_axis, (0, 1)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x  # the identity: no mask drawn, the counter does not move
        index, count = self.microbatch
        splits = self.splits
        if count > 1:
            if self.batch_axis is None:
                raise ValueError("this Dropout was built without a batch_axis: it cannot draw a microbatch's block")
            splits += ((self.batch_axis, index, count),)  # innermost: a block of this rank's batch columns
        global_shape, offset = placement.locate(splits, x.shape)
        y = F.dropout(x, self.p, self.seed, self.counter, global_shape=global_shape, offset=offset)
        if index == count - 1:
            self.counter += 1
        return y

    def block_drawer(self, shape, dtype, xp):
        """For attention that applies this dropout to its (b, a, s_q, s_k) probabilities one block of
        (query, key) positions at a time (blockwise and ring attention), in place of calling it on the
        whole: None when it is the identity, else ``keep(q_run, k_run)`` -> the (b, a, lq, lk) piece of
        the mask that ``forward`` would draw, scaled by 1/(1 - p), at those global runs [start, stop).

        ``shape``: this rank's b and a, and the GLOBAL s_q and s_k (the caller places the query and key
        axes; ``splits`` may place only b and a); the mask comes in ``dtype``. Moves the counter on as
        ``forward`` does, microbatches included, so that the blocks drawn later (in backward) are this call's."""
        if not self.training or self.p == 0:
            return None
        index, count = self.microbatch
        splits = self.splits
        if count > 1:
            if self.batch_axis is None:
                raise ValueError("this Dropout was built without a batch_axis: it cannot draw a microbatch's block")
            splits += ((self.batch_axis, index, count),)
        if any(split[0] % 4 in (2, 3) for split in splits):
            raise ValueError("attention drawn block by block places the query and key axes itself: "
                             "the dropout's splits may place only (b, a)")
        global_shape, offset = placement.locate(splits, shape)
        p, seed, counter, scale = self.p, self.seed, self.counter, numpy.dtype(dtype).type(1 / (1 - self.p))
        if index == count - 1:
            self.counter += 1
        batch, heads = shape[:2]

        def keep(q_run, k_run):
            size = (batch, heads, q_run[1] - q_run[0], k_run[1] - k_run[0])
            mask = rng.keep_mask(size, p, seed, counter, global_shape, offset[:2] + [q_run[0], k_run[0]], xp)
            return mask * scale  # bool times a scalar of dtype: the mask in dtype
        return keep

    def extra_repr(self):
        splits = f", splits={self.splits}" if self.splits else ""
        return f"p={self.p}, seed={self.seed}, counter={self.counter}{splits}"


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
