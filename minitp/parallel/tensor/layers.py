"""Megatron's two ways to split a Linear layer Y = X A (Shoeybi et al. 2019, section 3).

With t ranks in the tensor-parallel group and A of shape (in, out):

- ``ColumnParallelLinear`` splits A by columns, A = [A_1 ... A_t]: rank r computes X A_r, its own
  out/t columns of Y. No sum is needed, so a non-linearity such as GeLU can follow straight away.
- ``RowParallelLinear`` splits A by rows: rank r holds A_r = A[r·in/t : (r+1)·in/t] and multiplies the
  matching columns X_r of its input, giving a partial product; Y = Σ_r X_r A_r needs a sum over ranks.

Column then row is the Megatron MLP and attention: the column layer's per-rank output is exactly the
row layer's per-rank input, so the only communication is the row layer's sum (g forward) and, in
backward, the column layer's sum of input gradients (f backward).

With ``sequence_parallel=True`` (Korthikanti et al. 2022) the activations outside these layers are split
along the sequence: the column layer all-gathers its input (g) and the row layer reduce-scatters its
output (ḡ) instead of f and f̄.

Both are ``nn.Linear`` with a split axis: each rank draws only its block of the serial layer's initial
weights (``minitp.nn.init``: a value is a function of its global index), so the layer never exists whole
on any rank, and the t blocks together are exactly ``nn.Linear(in, out, seed=seed)``. Every parameter
carries ``split_axis``: the axis of the serial weight it is a block of (``None`` for a replicated one);
``minitp.parallel.tensor.shard`` and checkpoints read it to gather blocks back into serial arrays.
"""
import numpy

from minitp import comm
from minitp import functional as F
from minitp.autograd import Function
from minitp.functional.precision import product
from minitp.nn.layers import Linear
from minitp.parallel.tensor import mappings
from minitp.parallel.tensor.async_linear import LinearWithAsyncGradReduce


class LinearWithSequenceGather(Function):
    """Korthikanti's g fused with the column-parallel GEMM: Y_r = all-gather_s(X) A_r.

    Forward: X arrives as this rank's s/t tokens (s/t, b, in); the all-gather along the sequence gives
    every rank all s tokens, which multiply the rank's columns A_r: (s, b, in) @ (in, out/t).

    What is kept for backward is the shard of X, not the gathered X: the activation memory of the layer
    input is divided by t, as the paper's sbh(34/t) assumes. The price: backward all-gathers X again,
    because dA_r = X^T dY_r needs every token. dX = dY_r A_r^T is only this rank's partial sum (its
    columns' share), so the sum over ranks and the split back into sequence shards is one
    reduce-scatter: g's backward.
    """

    def forward(self, x_shard, weight, group=None, tag=None):
        self.group, self.tag = group, tag
        comm.checks.not_replicated(group, mappings.tag(tag, "g (sequence-parallel input)"), x_shard)
        self.save_for_backward(x_shard, weight)
        x = comm.all_gather(x_shard, group, axis=0, tag=mappings.tag(tag, "g forward"))
        # (s, b, in) @ (in, out/t) = (s, b, out/t), as one GEMM over the s*b tokens
        return product(x.reshape(-1, x.shape[-1]), weight).reshape(x.shape[:-1] + weight.shape[-1:])

    def backward(self, grad):
        x_shard, weight = self.saved
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (s*b, out/t)
        grad_x = grad_weight = None
        if self.needs_input_grad[0]:
            # (s*b, out/t) @ (out/t, in) = (s*b, in): this rank's part of dX, summed and re-split by g's backward
            partial = product(grad_rows, weight.T).reshape(grad.shape[:-1] + weight.shape[:1])
            grad_x = comm.reduce_scatter(partial, self.group, axis=0, tag=mappings.tag(self.tag, "g backward"))
        if self.needs_input_grad[1]:
            x = comm.all_gather(x_shard, self.group, axis=0,
                                tag=mappings.tag(self.tag, "g backward: re-gather X for dA"))
            grad_weight = product(x.reshape(-1, x.shape[-1]).T, grad_rows)  # (in, s*b) @ (s*b, out/t)
        return grad_x, grad_weight


class ColumnParallelLinear(Linear):
    """Y = X A + b with A (in, out) split by columns: rank r holds A_r, the columns
    [r·out/t, (r+1)·out/t), and the same block of b.

    Input: X replicated, (s, b, in), entering through f (identity forward; all-reduce of dX backward);
    or with ``sequence_parallel`` this rank's tokens (s/t, b, in), all-gathered along the sequence (g).
    Output: this rank's columns (s, b, out/t); ``gather_output=True`` all-gathers them into the full
    (s, b, out) on every rank (backward: each rank keeps its columns of the gradient).
    ``overlap=True``: backward starts the reduction of dX before the dA GEMM and waits for it after
    (``minitp.parallel.tensor.async_linear``); the same numbers.
    """

    weight_split_axis, bias_split_axis = 1, 0

    def __init__(self, in_features, out_features, bias=True, *, group, gather_output=False,
                 sequence_parallel=False, dtype=numpy.float32, seed=0, std=None, tag=None, overlap=False):
        out_per_rank = comm.divide(out_features, group.size, _what(tag, "out_features (columns split over tp)"))
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, seed=seed, std=std,
                         shard=(group.rank, group.size))
        self.group, self.out_per_rank = group, out_per_rank
        self.gather_output, self.sequence_parallel, self.tag = gather_output, sequence_parallel, tag
        self.overlap = overlap

    def forward(self, x):
        check_input(self, x, self.in_features, "this rank's s/t tokens, (s/t, b, in)" if self.sequence_parallel
                    else "the whole input, replicated on every rank of the group")
        if self.overlap or self.sequence_parallel:  # X A_r communicates inside its own op; b_r after it
            if self.overlap:
                y = LinearWithAsyncGradReduce.apply(x, self.weight, group=self.group, tag=self.tag,
                                                    sequence_parallel=self.sequence_parallel)
            else:
                y = LinearWithSequenceGather.apply(x, self.weight, group=self.group, tag=self.tag)
            if self.bias is not None:
                y = F.add(y, self.bias)
        else:  # f, then X A_r + b_r as one op (the bias added into the GEMM's output in place)
            y = F.linear(mappings.copy_to_tensor_parallel_region(x, self.group, self.tag), self.weight, self.bias)
        if self.gather_output:
            y = mappings.gather_from_tensor_parallel_region(y, self.group, self.tag)
        return y

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features} (columns {self.out_per_rank} per rank), "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(Linear):
    """Y = X A + b with A (in, out) split by rows: rank r holds A_r, the rows [r·in/t, (r+1)·in/t).

    Input: X split along its last axis, (s, b, in/t) -- the output of a column-parallel layer
    (``input_is_parallel=True``) -- or replicated (s, b, in) and split here (backward: all-gather of dX).
    Each rank's X_r A_r is a partial sum of Y. Output: Y = Σ_r X_r A_r summed over the group by f̄
    (all-reduce forward, identity backward), replicated (s, b, out); or with ``sequence_parallel``
    reduce-scattered along the sequence by ḡ, this rank's tokens (s/t, b, out).

    The bias is replicated and added once, after the sum: added before it, it would be counted t times.
    Under sequence parallelism it meets a different block of tokens on each rank, so its gradient is
    the sum of the ranks' contributions: it enters through f, whose backward all-reduces it.
    """

    weight_split_axis, bias_split_axis = 0, None

    def __init__(self, in_features, out_features, bias=True, *, group, input_is_parallel=True,
                 sequence_parallel=False, dtype=numpy.float32, seed=0, std=None, tag=None):
        in_per_rank = comm.divide(in_features, group.size, _what(tag, "in_features (rows split over tp)"))
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, seed=seed, std=std,
                         shard=(group.rank, group.size))
        self.group, self.in_per_rank = group, in_per_rank
        self.input_is_parallel, self.sequence_parallel, self.tag = input_is_parallel, sequence_parallel, tag

    def forward(self, x):
        if self.input_is_parallel:
            check_input(self, x, self.in_per_rank, "this rank's in/t features, a column-parallel layer's output")
        else:
            check_input(self, x, self.in_features, "the whole input, replicated (split here)")
            x = mappings.scatter_to_tensor_parallel_region(x, self.group, self.tag)
        partial = F.matmul(x, self.weight)  # (s, b, in/t) @ (in/t, out) = this rank's share of (s, b, out)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(partial, self.group, self.tag)
            bias = self.bias
            if bias is not None:
                bias = mappings.copy_to_tensor_parallel_region(bias, self.group, mappings.tag(self.tag, "bias"))
        else:
            y = mappings.reduce_from_tensor_parallel_region(partial, self.group, self.tag)
            bias = self.bias
        return F.add(y, bias) if bias is not None else y

    def extra_repr(self):
        return (f"{self.in_features} (rows {self.in_per_rank} per rank), {self.out_features}, "
                f"sequence_parallel={self.sequence_parallel}")


def check_input(layer, x, features, what):
    """``ValueError`` naming the layer, the shape it got and the shape it expects on this rank, unless ``x``
    is (s, b, ``features``). Every rank of the group is handed the same kind of input, so all raise alike."""
    if x.ndim != 3 or x.shape[-1] != features:
        name = f"{type(layer).__name__} {layer.tag!r}" if layer.tag else type(layer).__name__
        raise ValueError(f"{name}: got an input of shape {tuple(x.shape)}, expected (s, b, {features}) on tp rank "
                         f"{layer.group.rank} of {layer.group.size}: {what}")


def _what(tag, what):
    """The size named in a divisibility error: the layer's tag first, when it has one."""
    return f"{tag}: {what}" if tag else what
