"""The MLP block split over t ranks, both ways the learner's notebook tries (Shoeybi et al. 2019, section 3).

``ParallelMLP`` is Megatron's: A split by columns, B by rows. ``SyncPointMLP`` is the first idea, A split
by rows, which the paper rejects because of the sum it forces before GeLU. Both are the serial ``MLP``
built from other layers (``minitp.nn.builders``), so both compute exactly the serial ``MLP``; the
collective log shows what each costs.
"""
from minitp import comm
from minitp.nn.mlp import MLP
from minitp.parallel.tensor.builders import TensorParallelLayers
from minitp.parallel.tensor.layers import RowParallelLinear


class ParallelMLP(MLP):
    """Megatron's MLP: Y = GeLU(X A), Z = Dropout(Y B), with A = [A_1 ... A_t] split by columns and B by rows.

    Rank r computes Y_r = GeLU(X A_r) -- GeLU acts on each column separately, so on its own columns it
    needs nothing from the other ranks -- then Y_r B_r, its partial sum of Y B. One all-reduce (f̄)
    forward sums them; in backward, f's all-reduce sums the ranks' contributions to dX. Two
    all-reduces of an s×b×h tensor per MLP, forward and backward together. Written out, on rank r::

        Z = Dropout( f̄( GeLU( f(X) A_r + b1_r ) B_r ) + b2 )       fc1 = f, A_r, b1_r;  fc2 = B_r, f̄, b2

    Shapes on rank r: X (s, b, h) replicated -> (s, b, ffn/t) -> (s, b, h) replicated. With
    ``sequence_parallel``: X (s/t, b, h) -> g -> (s, b, ffn/t) -> ḡ -> (s/t, b, h), and dropout on the
    rank's tokens.

    This is ``MLP`` built with ``TensorParallelLayers(group, sequence_parallel)``: the constructor and
    forward are MLP's; f lives in ``ColumnParallelLinear.forward``, f̄ in ``RowParallelLinear.forward``.
    """

    def __init__(self, hidden, ffn_hidden=None, *, group, sequence_parallel=False, data_parallel=None, **options):
        super().__init__(hidden, ffn_hidden, layers=TensorParallelLayers(group, sequence_parallel, data_parallel),
                         **options)
        self.group = group


class SyncPointLayers(TensorParallelLayers):
    """The notebook's split: BOTH linears split by rows (their input features), inputs replicated."""

    def column_linear(self, in_features, out_features, *, dtype, seed, bias=True, std=None, tag=None):
        return RowParallelLinear(in_features, out_features, bias=bias, group=self.group, input_is_parallel=False,
                                 dtype=dtype, seed=seed, std=std, tag=tag and f"sync-point {tag}")

    row_linear = column_linear

    def local(self, total, what):
        return total  # GeLU sees the full, summed ffn width on every rank


class SyncPointMLP(MLP):
    """The learner's notebook's "feed forward with sync point": A split by ROWS, the contraction dimension.

    Rank r holds rows A_r of A and the matching columns X_r of X (split here, no communication), and
    computes X_r A_r: a partial sum of X A, the full (s, b, ffn) width. GeLU is not linear --
    GeLU(X_1 A_1 + X_2 A_2) ≠ GeLU(X_1 A_1) + GeLU(X_2 A_2) -- so the partial sums must be all-reduced
    *before* GeLU: the sync point, an all-reduce of s×b×ffn = 4·s×b×h numbers. B is then split by rows as
    well (GeLU's output is replicated; each rank takes its columns of it) and a second all-reduce, of
    s×b×h, sums Y_r B_r.

    Forward: 2 all-reduces (4sbh + sbh). Backward: the two splits become all-gathers of dY (4sbh) and
    dX (sbh). Megatron's ``ParallelMLP`` moves sbh each way instead: column-then-row removes the sync point.
    """

    def __init__(self, hidden, ffn_hidden=None, *, group, **options):
        ffn_hidden = 4 * hidden if ffn_hidden is None else ffn_hidden
        comm.divide(hidden, group.size, "hidden (fc1's rows, split over tp)")
        comm.divide(ffn_hidden, group.size, "ffn_hidden (fc2's rows, split over tp)")
        super().__init__(hidden, ffn_hidden, layers=SyncPointLayers(group), **options)
        self.group = group
