"""Where do a mixture's experts live, and which ranks reduce their gradients? ``ExpertParallelLayers``.

``TensorParallelLayers`` with a mixture of experts' answers (``minitp.nn.builders`` lists the roles):

    role            serial                   expert-parallel (mesh.ep, carved out of dp)
    expert_range    all E experts            E/ep: ep rank r holds experts [r·E/ep, (r+1)·E/ep)
    expert_layers   plain layers             tensor-parallel, without SP: each expert's MLP split over tp
                                             (fc1 by columns, fc2 by rows), as the dense MLP
    mark_expert     --                       p.replica_group = mesh.expert_dp, p.expert_group = mesh.ep
    moe_tokens      all tokens               under SP the sequence gathered over tp first (g)
    token_counts    these                    the (k, E) choice counts all-gathered over dp: the tokens
                                             of earlier replicas and of the global batch
    dispatch        identity                 counts, then the rows, by all-to-all over ep
    combine         identity                 the rows back (the dispatch with the counts swapped)
    moe_output      --                       under SP this rank's block of the sequence

**Why split each expert over tp, not give tp ranks whole experts.** Without SP the tp ranks of a replica
hold the same tokens, so each tp rank routes them identically and sends them to the same tp rank of the
expert's ep rank: the dispatch runs within a tp slice of the mesh, and the expert is then the dense
Megatron MLP -- f, column, GeLU, row, f̄ -- on its rows. Its bytes over tp are the dense MLP's for the rows
it gets, and each rank holds 1/(ep·tp) of the expert weights. Whole experts per tp rank would need tokens
to cross tp as well (an extra all-to-all) for the same memory. Under SP the tokens are first all-gathered
over tp (Megatron gathers them before routing too), so the same holds; the output leaves as this rank's
sequence block.

**Gradients.** A dense parameter's gradient is averaged over every replica (dp). An expert's rows come
from the ep ranks of its group, so after backward expert e on one ep group holds the sum of its tokens'
gradients from those ep ranks; the dp/ep copies of e in the other groups (``mesh.expert_dp``) hold the
rest. So expert gradients are summed over ``expert_dp`` and divided by dp, the same 1/dp every gradient
gets (Megatron's ``expert_gradient_scaling_factor``): ``p.replica_group`` tells the one gradient
synchronisation (``minitp.parallel.data.sync``) which group to reduce a parameter over.

Refused (``ValueError`` on every rank before any layer or collective): ep not dividing E; pipeline
stages or context parallelism with experts (not built: the aux loss would have to cross stages, and cp's
zigzag blocks are not a contiguous run of the capacity's token order).
"""
import numpy

from minitp import comm
from minitp.parallel.expert.dispatch import combine_rows, dispatch_rows
from minitp.parallel.tensor import mappings
from minitp.parallel.tensor.builders import TensorParallelLayers


class ExpertParallelLayers(TensorParallelLayers):
    """The layers of a ``ParallelGPT`` with experts on ``mesh``: tensor-parallel over ``mesh.tp``
    (optionally SP), the batch over ``mesh.dp``, the experts over ``mesh.ep``."""

    def __init__(self, mesh, sequence_parallel=False, overlap=False, seq_len=None):
        if mesh.pp_size > 1 or mesh.cp_size > 1:
            raise ValueError(f"experts run on (dp, ep, tp) meshes: pipeline stages (pp={mesh.pp_size}) and context "
                             f"parallelism (cp={mesh.cp_size}) with experts are not built")
        super().__init__(mesh.tp, sequence_parallel, mesh.dp, overlap, seq_len)
        self.mesh, self.ep, self.expert_dp = mesh, mesh.ep, mesh.expert_dp

    def expert_range(self, experts):
        per = comm.divide(experts, self.ep.size, "the experts (split over ep)")
        return range(self.ep.rank * per, (self.ep.rank + 1) * per)

    def expert_layers(self):
        # each expert's MLP split over tp, never sequence-parallel: its rows are whole tokens
        return TensorParallelLayers(self.group, overlap=self.overlap)

    def mark_expert(self, parameter):
        parameter.replica_group = self.expert_dp  # summed over the replicas holding the same experts
        parameter.expert_group = self.ep  # and, for norms and checkpoints, spread over ep

    def moe_tokens(self, x):
        if not self.sequence_parallel:
            return x
        mappings.check_sequence_block(x, self.group, self.seq_len, "moe: the sequence-parallel input")
        # backward: each rank's block of dx, not a sum -- every tp rank computed the whole dx (the router is
        # replicated, and each expert's f already summed its fc1's dx over tp)
        return mappings.gather_from_sequence_parallel_region(x, self.group, "moe", tensor_parallel_output_grad=False)

    def moe_output(self, y):
        if not self.sequence_parallel:
            return y
        return mappings.scatter_to_sequence_parallel_region(y, self.group, "moe")

    def token_counts(self, counts):
        """The replicas' (k, E) counts all-gathered over dp (in dp order: the batch's column order):
        (sum of the earlier ones', sum of all, dp)."""
        dp = self.data_parallel
        if dp.size == 1:
            return numpy.zeros_like(counts), counts, 1
        gathered = numpy.asarray(comm.all_gather(counts[None], dp, axis=0, tag="moe: choice counts"))
        return gathered[:dp.rank].sum(axis=0), gathered.sum(axis=0), dp.size

    def dispatch(self, x, counts):
        if self.ep.size == 1:
            return super().dispatch(x, counts)
        return dispatch_rows(x, counts, self.ep, tag="moe")

    def combine(self, y, counts, arrived):
        if self.ep.size == 1:
            return y
        return combine_rows(y, counts, arrived, self.ep, tag="moe")
