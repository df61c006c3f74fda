"""Multi-head self-attention on (s, b, h) activations, with a fused QKV projection laid out head by head.

Shapes: s sequence, b batch, h hidden, a heads, d = h / a the head size.

    x (s, b, h) --qkv--> (s, b, 3h) --> q, k, v each (b, a, s, d)
    softmax(q k^T / sqrt(d)) (b, a, s, s) --dropout--> @ v (b, a, s, d) --> (s, b, h) --proj--> --dropout-->

Heads never look at each other between ``qkv`` and ``proj``: each head's (s, s) score matrix uses only its
own q, k and v columns. That is what lets Megatron (Shoeybi et al. 2019, section 3) give each rank whole
heads: ``qkv`` split by columns (a column-parallel layer), ``proj`` split by rows (row-parallel), and the
attention core of a rank's heads computed with no communication at all.

Where a learner's notebook on tensor parallelism goes wrong in its multi-head attention sketch (its part
"3. MHA", which splits q, k and v over GPUs by hand), and the line here
that does it right:

1. ``ks = q.reshape(...)`` and ``vs = q.reshape(...)``: k and v are cut from q, so every "key" and "value"
   is a query. Here q, k and v are three different slices of the qkv output (``F.split`` in ``forward``).
2. ``q.reshape(3, B*heads, S, -1)`` then ``reshape(num_gpus, B*heads/num_gpus, ...)``: the flattened axis
   is batch-major (index = batch * heads + head), so cutting it into num_gpus blocks gives GPU 0 the first
   half of the *batch* with all its heads: data parallelism, not head parallelism. Here heads keep their
   own axis, (b, a, s, d), and a head-parallel rank takes a block of that axis (its attention dropout
   says so: ``splits`` on axis 1). (The same line also hard-codes the sequence length 120.)
3. ``for i in qs: qs[i].to(f'cuda:{i}')``: iterating a tuple yields its tensors, which are then used as
   indices into the tuple, and ``.to()`` returns a new tensor that the loop throws away, so nothing moves.
   Here nothing needs moving: each MPI rank computes its own heads where its weights already are.
4. ``torch.cat[gpu1, gpu2]`` subscripts the function instead of calling it (``torch.cat([...], dim=-1)``),
   and the concatenation itself is not needed: Megatron feeds each rank's heads straight into its rows of
   ``proj`` and sums the partial outputs with one all-reduce (g).
5. ``qkv.reshape(B, S, 3, -1)`` assumes the columns are [all q | all k | all v]. Then a contiguous block of
   columns holds q of some heads *or* k of some heads, never whole heads, and a column-parallel split of
   the weight would hand a rank the wrong columns. ``MultiHeadAttention`` orders them head-major instead.
"""
import numpy

from minitp import functional as F
from minitp.functional import attention_core  # noqa: F401 (nn's name for it, as before)
from minitp.nn import init
from minitp.nn.builders import SERIAL
from minitp.nn.module import Module
from minitp.nn.recompute import check_recompute, recompute


class MultiHeadAttention(Module):
    """Self-attention with a fused ``qkv`` Linear (h -> 3h), ``heads`` heads, an output ``proj``
    (h -> h) and two dropouts: ``attention_dropout`` on the probabilities, ``dropout`` on the output
    (the block's residual dropout).

    The qkv output columns are ordered HEAD-MAJOR: for head i, columns [3d*i, 3d*(i+1)) hold
    [q_i | k_i | v_i], each d wide. So any contiguous block of whole heads' columns, [3d*i0, 3d*i1),
    holds everything those heads need, and tensor parallelism shards the qkv weight by plain column
    blocks: rank r of t takes columns [3h*r/t, 3h*(r+1)/t), i.e. heads [a*r/t, a*(r+1)/t). (With
    torch's [all q | all k | all v] order a column block would hold some heads' q and no k or v.)

    ``recompute="selective"`` keeps only q, k and v for backward and recomputes the attention core there
    (Korthikanti et al. 2022, section 5): the (b, a, s, s) scores, probabilities and dropout mask are
    never kept. See ``minitp.nn.recompute``.
    """

    recompute = None  # None or "selective"

    def __init__(self, hidden, heads, causal=True, attention_dropout=0.0, dropout=0.0, seed=0,
                 dtype=numpy.float32, recompute=None, init_std=None, output_std=None, layers=SERIAL):
        super().__init__()
        if heads < 1 or hidden % heads:
            raise ValueError(f"heads ({heads}) must divide hidden ({hidden})")
        self.recompute = check_recompute(recompute, (None, "selective"), type(self).__name__)
        self.hidden, self.head_dim, self.causal = hidden, hidden // heads, causal
        self.heads_total = heads
        # the heads computed here: all of them serially, a/t on a tensor-parallel rank
        self.heads = layers.local(heads, "heads (whole heads per tensor-parallel rank)")
        self.qkv = layers.column_linear(hidden, 3 * hidden, dtype=dtype, seed=init.derive_seed(seed, "qkv"),
                                        std=init_std, tag="attention qkv")
        self.attention_dropout = layers.attention_dropout(attention_dropout,
                                                          init.derive_seed(seed, "attention_dropout"))
        self.core = layers.attention_core  # plain, or under context parallelism ring attention or Ulysses
        self.proj = layers.row_linear(hidden, hidden, dtype=dtype, seed=init.derive_seed(seed, "proj"),
                                      std=output_std, tag="attention proj")
        self.dropout = layers.dropout(dropout, init.derive_seed(seed, "dropout"))

    def forward(self, x):
        if x.ndim != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"{type(self).__name__}({self.hidden}) got an input of shape {tuple(x.shape)}, "
                             f"expected (s, b, {self.hidden})")
        heads, head_dim = self.heads, self.head_dim  # heads: the heads computed here (a/t on a TP rank)
        # (s, b, h) @ (h, 3h) = (s, b, 3h), read head-major as (s, b, a, 3, d). Take s and b from the
        # product, not from x: under sequence parallelism x holds s/t tokens and qkv gathers all s.
        qkv = self.qkv(x)
        seq, batch = qkv.shape[:2]
        qkv = F.reshape(qkv, (seq, batch, heads, 3, head_dim))
        # three different slices: q, k and v each (s, b, a, 1, d) -> (s, b, a, d) -> (b, a, s, d)
        q, k, v = (F.transpose(F.reshape(part, (seq, batch, heads, head_dim)), (1, 2, 0, 3))
                   for part in F.split(qkv, 3, axis=3))

        def core(q, k, v):
            return self.core(q, k, v, self.causal, self.attention_dropout)
        if self.recompute == "selective":
            # keep q, k, v (3sbh); the 5as^2b bytes of scores, probabilities and mask are re-made in backward
            context = recompute(core, q, k, v, modules=[self.attention_dropout])
        else:
            context = core(q, k, v)
        # (b, a, s, d) -> (s, b, a, d) -> (s, b, a*d): head i's d features land in columns [d*i, d*(i+1)),
        # which are the rows of proj that a head-parallel rank holding head i owns
        context = F.reshape(F.transpose(context, (2, 0, 1, 3)), (seq, batch, heads * head_dim))
        return self.dropout(self.proj(context))  # (s, b, a*d) @ (a*d, h) = (s, b, h)

    def extra_repr(self):
        here = f" ({self.heads} on this rank)" if self.heads != self.heads_total else ""
        return f"{self.hidden}, heads={self.heads_total}{here}, causal={self.causal}"
