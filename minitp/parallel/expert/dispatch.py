"""How do a mixture's tokens reach experts on other ranks, and their gradients come back?

A rank's routed rows, grouped by expert and so by the ep rank that holds it, go out in one all-to-all of
uneven counts; each expert's outputs come back the same way (GShard, Lepikhin et al. 2020, §3.2;
Megatron-core's ``MoEAlltoAllTokenDispatcher``):

    counts (E,) per expert  --all_to_all of integers, (ep, E/ep)-->  rows arriving from each source
    rows (N, h) by expert   --dispatch: all_to_all_v-->              (M, h) source-major, then by expert
    experts on their rows
    outputs (M, h)          --combine: all_to_all_v, counts swapped-->  (N, h), in the order sent

The counts go first because every rank must post its receive buffer's size before the rows arrive. The
rows are sent as they are, ``Alltoallv`` with per-rank counts and displacements: no padding to a
capacity (what GShard's einsum dispatch and Megatron's "drop and pad" send instead, a fixed shape).

**Backward.** Dispatch only moves rows: a permutation of the ranks' numbers, from rank i's row r to rank
j's row r'. Its adjoint is the inverse permutation -- the same exchange with the counts swapped, each
gradient row going back where its row came from -- so the backward of dispatch is a combine and the
backward of combine a dispatch (``AllToAllV``; the adjoint test ⟨F x, y⟩ = ⟨x, F* y⟩ in
tests/test_expert_dispatch.py). Bytes per rank each way: the rows it does not keep, (N − N_self)·h·e.
"""
import numpy

from minitp import backend, comm
from minitp.autograd import Function
from minitp.parallel.tensor import mappings


class AllToAllV(Function):
    """``comm.all_to_all_v`` forward (``send_counts`` rows to each rank, ``receive_counts`` from each),
    the same exchange with the counts swapped backward."""

    def forward(self, x, group, send_counts, receive_counts, tag):
        self.group, self.send_counts, self.receive_counts, self.tag = group, send_counts, receive_counts, tag
        return comm.all_to_all_v(x, group, send_counts, receive_counts, tag=mappings.tag(tag, "forward"))

    def backward(self, grad):
        return comm.all_to_all_v(grad, self.group, self.receive_counts, self.send_counts,
                                 tag=mappings.tag(self.tag, "backward"))


def exchange_counts(counts, group):
    """(sources, E/ep): from each rank of ``group`` (``mesh.ep``), how many rows it sends to each of this
    rank's experts, given this rank's ``counts`` (E,) rows per expert -- one all-to-all of integers."""
    n = group.size
    per_rank = numpy.asarray(counts, dtype=numpy.int64).reshape(n, -1)  # (ep, E/ep): for rank j, its experts
    return backend.to_host(comm.all_to_all(per_rank, group, 0, 0, tag="expert counts"))


def dispatch_rows(x, counts, group, tag="experts"):
    """Rows ``x`` (N, h), grouped by expert with ``counts`` (E,) rows each, to the ep ranks that hold the
    experts (expert e on ep rank e // (E/ep)). Returns (the rows arrived (M, h), source-major and within
    a source by expert; ``arrived`` (sources, E/ep) rows per source and local expert)."""
    arrived = exchange_counts(counts, group)
    send = numpy.asarray(counts).reshape(group.size, -1).sum(axis=1)
    received = AllToAllV.apply(x, group=group, send_counts=send, receive_counts=arrived.sum(axis=1),
                               tag=mappings.tag(tag, "dispatch"))
    return received, arrived


def combine_rows(y, counts, arrived, group, tag="experts"):
    """The experts' outputs ``y`` (M, h), in the order ``dispatch_rows`` delivered them, back to where their
    rows came from: (N, h) in the order sent (the dispatch with the counts swapped)."""
    send = numpy.asarray(counts).reshape(group.size, -1).sum(axis=1)
    return AllToAllV.apply(y, group=group, send_counts=arrived.sum(axis=1), receive_counts=send,
                           tag=mappings.tag(tag, "combine"))
