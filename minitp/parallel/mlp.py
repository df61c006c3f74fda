"""The MLP block split over t ranks, both ways the seed notebook tries (Shoeybi et al. 2019, section 3).

``ParallelMLP`` is Megatron's: A split by columns, B by rows. ``SyncPointMLP`` is the first idea, A split
by rows, which the paper rejects because of the sum it forces before GeLU. Both compute exactly the
serial ``MLP``; the collective log shows what each costs.
"""
import numpy

from minitp import dist
from minitp.nn import init
from minitp.nn.layers import GELU, Dropout
from minitp.nn.mlp import MLP
from minitp.nn.module import Module
from minitp.parallel.layers import ColumnParallelLinear, RowParallelLinear
from minitp.parallel.sequence import SequenceParallelDropout


class ParallelMLP(MLP):
    """Megatron's MLP: Y = GeLU(X A), Z = Dropout(Y B), with A = [A_1 ... A_t] split by columns and B by rows.

    Rank r computes Y_r = GeLU(X A_r) -- GeLU acts on each column separately, so on its own columns it
    needs nothing from the other ranks -- then Y_r B_r, its partial sum of Y B. One all-reduce (f̄)
    forward sums them; in backward, f's all-reduce sums the ranks' contributions to dX. Two
    all-reduces of an s×b×h tensor per MLP, forward and backward together.

    Shapes on rank r: X (s, b, h) replicated -> (s, b, ffn/t) -> (s, b, h) replicated. With
    ``sequence_parallel``: X (s/t, b, h) -> g -> (s, b, ffn/t) -> ḡ -> (s/t, b, h), and dropout on the
    rank's tokens.

    The forward is the serial ``MLP``'s, unchanged: only its layers are swapped for parallel ones.
    """

    def __init__(self, hidden, ffn_hidden=None, dropout=0.0, seed=0, dtype=numpy.float32, approximate="tanh",
                 sequence_parallel=False, group=None):
        Module.__init__(self)  # MLP's forward, with these layers instead of MLP's
        group = dist.tensor_parallel_group(group)
        ffn_hidden = 4 * hidden if ffn_hidden is None else ffn_hidden
        dist.divide(ffn_hidden, group.size, "ffn_hidden (fc1's columns, split over tp)")
        self.hidden, self.ffn_hidden, self.group = hidden, ffn_hidden, group
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, sequence_parallel=sequence_parallel, group=group,
                                        dtype=dtype, seed=init.derive_seed(seed, "fc1"), tag="mlp fc1")
        self.gelu = GELU(approximate)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, input_is_parallel=True, sequence_parallel=sequence_parallel,
                                     group=group, dtype=dtype, seed=init.derive_seed(seed, "fc2"), tag="mlp fc2")
        dropout_seed = init.derive_seed(seed, "dropout")
        self.dropout = (SequenceParallelDropout(dropout, dropout_seed, group) if sequence_parallel
                        else Dropout(dropout, dropout_seed))


class SyncPointMLP(MLP):
    """The seed notebook's "feed forward with sync point": A split by ROWS, the contraction dimension.

    Rank r holds rows A_r of A and the matching columns X_r of X (split here, no communication), and
    computes X_r A_r: a partial sum of X A, the full (s, b, ffn) width. GeLU is not linear --
    GeLU(X_1 A_1 + X_2 A_2) ≠ GeLU(X_1 A_1) + GeLU(X_2 A_2) -- so the partial sums must be all-reduced
    *before* GeLU: the sync point, an all-reduce of s×b×ffn = 4·s×b×h numbers. B is then split by rows as
    well (GeLU's output is replicated; each rank takes its columns of it) and a second all-reduce, of
    s×b×h, sums Y_r B_r.

    Forward: 2 all-reduces (4sbh + sbh). Backward: the two splits become all-gathers of dY (4sbh) and
    dX (sbh). Megatron's ``ParallelMLP`` moves sbh each way instead: column-then-row removes the sync point.
    """

    def __init__(self, hidden, ffn_hidden=None, dropout=0.0, seed=0, dtype=numpy.float32, approximate="tanh",
                 group=None):
        Module.__init__(self)
        group = dist.tensor_parallel_group(group)
        ffn_hidden = 4 * hidden if ffn_hidden is None else ffn_hidden
        dist.divide(hidden, group.size, "hidden (fc1's rows, split over tp)")
        dist.divide(ffn_hidden, group.size, "ffn_hidden (fc2's rows, split over tp)")
        self.hidden, self.ffn_hidden, self.group = hidden, ffn_hidden, group
        self.fc1 = RowParallelLinear(hidden, ffn_hidden, input_is_parallel=False, group=group, dtype=dtype,
                                     seed=init.derive_seed(seed, "fc1"), tag="sync-point fc1")
        self.gelu = GELU(approximate)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, input_is_parallel=False, group=group, dtype=dtype,
                                     seed=init.derive_seed(seed, "fc2"), tag="sync-point fc2")
        self.dropout = Dropout(dropout, init.derive_seed(seed, "dropout"))
