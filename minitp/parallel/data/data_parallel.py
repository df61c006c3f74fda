"""Data parallelism over the mesh's dp group, and gradient clipping by the global norm across shards.

dp replicas hold the same (sharded) model and each takes its own slice of the batch. The loss is a mean
over the tokens, and the global batch is the union of the replicas' equal slices, so

    L = (1/dp) Σ_replicas L_replica      and      ∂L/∂θ = (1/dp) Σ_replicas ∂L_replica/∂θ

one all-reduce (a sum) and a division turn each replica's gradient into the gradient of the whole batch.
Every replica then takes the same optimizer step and the replicas stay identical.

**Buckets.** A model has hundreds of parameter tensors; one all-reduce each would pay MPI's latency
hundreds of times for small messages. The gradients are copied into one flat buffer per ``bucket_bytes``
(25 MiB by default, as torch's DistributedDataParallel) and each buffer is all-reduced once: for a small
model, ONE all-reduce per step (``minitp.parallel.data.buckets``, which also starts the buckets during
backward -- ``overlap`` -- and reduce-scatters them for ZeRO-1, ``minitp.parallel.data.zero``).

**Clipping.** ``clip_grad_norm`` computes the norm of the gradient of the whole serial model from the
shards: a split parameter's squares are summed over the tp ranks (each holds a different block), a
replicated parameter's are counted once (every rank holds the same copy), and each pipeline stage's
total is summed over pp (each stage holds other layers; the last stage's copy of a tied table, marked
``tied_copy``, is counted on the first stage only). Over dp nothing is added: after
the gradient synchronisation (``sync.py``) every replica holds the same, already averaged, gradient.

**Context parallelism** splits each replica's sequence over the cp ranks, and every parameter is
replicated over them as over dp: rank (dp, cp) computes the mean loss over its own s/cp tokens of its
B/dp columns -- equal shares, so the global mean loss is the mean of the dp·cp ranks' losses, and its
gradient the mean of their gradients. The same all-reduce and division serve, over ``mesh.dp_cp``
(dp × cp) instead of ``mesh.dp``: every parameter's gradient is then summed over all the tokens -- wpe's
included, whose rows each cp rank read only for its own positions.

Every function takes ``mesh=None`` for a serial model on one process (nothing to split or reduce), so a
training loop is the same code for ``nn.GPT`` and ``ParallelGPT``.
"""
import math

import numpy

from minitp import backend, comm
from minitp.nn.optim import check_max_norm, clip_coefficient
from minitp.parallel.tensor.shard import split_axis


def split_batch(array, mesh=None, axis=1):
    """This replica's slice of the global batch ``array``: along ``axis`` (ids and targets are (s, b):
    axis 1), columns [dp_rank·B/dp, (dp_rank+1)·B/dp) of B. A view; no communication.

    ``ValueError`` when dp does not divide B -- on every rank, since every rank checks the same numbers.
    """
    if mesh is None or mesh.dp_size == 1:
        return array
    comm.divide(array.shape[axis], mesh.dp_size, "the batch size (split over the dp replicas)")
    return comm.split(array, mesh.dp, axis)


def replicas(mesh):
    """The group over which the parameters are replicated and the tokens split: ``mesh.dp``, or with
    context parallelism ``mesh.dp_cp`` (dp × cp). None for a serial model."""
    if mesh is None:
        return None
    return mesh.dp if mesh.cp_size == 1 else mesh.dp_cp


def grad_norm(module, mesh=None):
    """The 2-norm of the gradient of the whole (serial) model, from this rank's shards; the same number
    on every rank. One all-reduce of one number over ``mesh.tp`` (tagged "grad norm"), and with
    pipeline stages one over ``mesh.pp`` ("grad norm (stages)").

    Squares are summed in float64: split parameters' over the tp ranks, replicated parameters' once
    (every tp rank holds the same copy; adding them t times would count them t times), stages' over pp.
    A mixture's experts (``p.expert_group``: ``mesh.ep``) are spread over the ep ranks, each holding
    others: their squares (summed over tp first where split) are summed over ep too -- one more number in
    the tp all-reduce and one all-reduce over ep, only for a model with experts.
    """
    split_squares, replicated_squares = 0.0, 0.0
    expert_split, expert_replicated, experts = 0.0, 0.0, None
    for p in module.parameters():
        if p.grad is None or getattr(p, "tied_copy", False):
            continue
        grad = p.grad.astype(numpy.float64, copy=False)
        squares = float(backend.array_module(grad).vdot(grad.ravel(), grad.ravel()))
        if getattr(p, "expert_group", None) is not None:
            experts = p.expert_group
            if split_axis(p) is None:
                expert_replicated += squares
            else:
                expert_split += squares
        elif split_axis(p) is None:
            replicated_squares += squares
        else:
            split_squares += squares
    if mesh is not None and mesh.tp_size > 1:
        if experts is None:
            split_squares = float(comm.all_reduce(numpy.array([split_squares]), mesh.tp, tag="grad norm")[0])
        else:
            split_squares, expert_split = (float(v) for v in comm.all_reduce(
                numpy.array([split_squares, expert_split]), mesh.tp, tag="grad norm"))
    squares = split_squares + replicated_squares
    if experts is not None:
        expert_squares = expert_split + expert_replicated
        if experts.size > 1:
            expert_squares = float(comm.all_reduce(numpy.array([expert_squares]), experts, tag="grad norm (experts)")[0])
        squares += expert_squares
    if mesh is not None and mesh.pp_size > 1:
        squares = float(comm.all_reduce(numpy.array([squares]), mesh.pp, tag="grad norm (stages)")[0])
    return math.sqrt(squares)


def clip_grad_norm(module, max_norm, mesh=None, eps=1e-6):
    """Scale every gradient of ``module`` by max_norm / (norm + eps) whenever that factor is below 1 --
    exactly torch's ``clip_grad_norm_`` (which clamps the factor at 1; ``nn.optim.clip_coefficient``,
    the rule ZeRO-1's slices are clipped by too) -- and return the norm before
    clipping, the same on every rank. ``max_norm=None``: measure only. ``ValueError`` for a max_norm
    that is not positive (a negative one would flip the gradient; 0 would zero it).

    Call it after the gradients are averaged (``sync.py``): the norm is then that of the global batch's gradient, and
    every replica scales by the same factor. The gradients are replaced, not scaled in place.
    """
    check_max_norm(max_norm)  # before the norm's all-reduces: every rank refuses, none is left waiting
    norm = grad_norm(module, mesh)
    scale = clip_coefficient(norm, max_norm, eps)  # the one rule, shared with ZeroOptimizer.clip_grad_norm
    if scale < 1:
        for p in module.parameters():
            if p.grad is not None:
                p.grad = p.grad * scale
    return norm


def average_over_data_parallel(value, mesh=None):
    """The mean over the dp replicas (and cp ranks: ``replicas``) of a number (e.g. each rank's loss): the
    global batch's loss, since their shares of the tokens are equal. One all-reduce of one number
    (tagged "loss")."""
    group = replicas(mesh)
    if group is None or group.size == 1:
        return float(value)
    return float(comm.all_reduce(numpy.array([float(value)]), group, tag="loss")[0]) / group.size
