"""Megatron's asynchronous linear backward: the column-parallel layer's input-gradient reduction crosses
the wire while the weight-gradient GEMM runs (Megatron-LM's ``LinearWithGradAccumulationAndAsync
Communication``; Shoeybi et al. 2019 and Korthikanti et al. 2022 for the operators).

The backward of Y_r = X A_r computes two GEMMs that do not depend on each other:

    dX = Σ_r dY_r A_rᵀ    every rank's partial product, summed over tp (f's all-reduce; under sequence
                          parallelism g's reduce-scatter, each rank keeping its tokens)
    dA_r = Xᵀ dY_r        this rank's own, no communication

Done in that order, with blocking collectives (``ColumnParallelLinear`` without ``overlap``), the rank
waits for the sum while it could be computing dA_r. Here the reduction of dX is *started* right after
its partial product, dA_r is computed while it is in flight, and only then is it waited for. Under
sequence parallelism the all-gather of X that dA_r needs (X is kept sharded) is likewise started before
the dX GEMM and waited for after it.

The numbers are the same as the blocking layer's: the same products, the same sums, in the same order.
What makes the bytes move during the GEMM is ``minitp.comm.nonblocking``'s progress thread (MPI itself
moves a non-blocking collective only inside MPI calls).
"""
from minitp import comm
from minitp.autograd import Function
from minitp.functional.precision import product
from minitp.parallel.tensor import mappings

SEQUENCE_AXIS = 0


class LinearWithAsyncGradReduce(Function):
    """Y_r = X A_r (column-parallel, no bias) whose backward overlaps the reduction of dX with dA_r's GEMM.

    ``sequence_parallel=False``: X is the replicated (s, b, in) input (f's identity forward), kept for
    backward; backward all-reduces dX (f's backward, tagged "f backward").
    ``sequence_parallel=True``: X arrives as this rank's tokens (s/t, b, in) and is all-gathered along the
    sequence (g); the shard is kept, re-gathered in backward for dA_r, and dX is reduce-scattered (g's
    backward). Output (s, b, out/t) either way.
    """

    def forward(self, x, weight, group=None, tag=None, sequence_parallel=False):
        self.group, self.tag, self.sequence_parallel = group, tag, sequence_parallel
        self.save_for_backward(x, weight)
        if sequence_parallel:
            x = comm.all_gather(x, group, axis=SEQUENCE_AXIS, tag=mappings.tag(tag, "g forward"))
        return product(x.reshape(-1, x.shape[-1]), weight).reshape(x.shape[:-1] + weight.shape[-1:])

    def backward(self, grad):
        x, weight = self.saved
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (s*b, out/t)
        gathering = None
        if self.sequence_parallel and self.needs_input_grad[1]:
            gathering = comm.iall_gather(x, self.group, tag=mappings.tag(self.tag, "g backward: re-gather X for dA"))
        reducing = None
        if self.needs_input_grad[0]:
            # (s*b, out/t) @ (out/t, in): this rank's part of dX, summed (and re-split under SP) on the wire
            partial = product(grad_rows, weight.T).reshape(grad.shape[:-1] + weight.shape[:1])
            if self.sequence_parallel:
                reducing = comm.ireduce_scatter(partial, self.group, tag=mappings.tag(self.tag, "g backward"))
            else:
                reducing = comm.iall_reduce(partial, self.group, tag=mappings.tag(self.tag, "f backward"))
        grad_weight = None
        if self.needs_input_grad[1]:
            full_x = gathering.wait() if gathering is not None else x
            grad_weight = product(full_x.reshape(-1, full_x.shape[-1]).T, grad_rows)  # while dX is on the wire
        grad_x = reducing.wait() if reducing is not None else None
        return grad_x, grad_weight
