"""One training step, whatever the mesh (Megatron's ``get_forward_backward_func`` + ``finalize_model_grads``):

    optimizer.zero_grad()
    gradients.start_step(m)           the synchronisation learns how many backwards make a gradient final
    loss = forward_backward(...)      the whole batch, or m microbatches through the pipeline's stages;
                                      overlapped buckets start their reductions inside the last backward
    gradients.finish()                the tied table summed over the pipeline's ends; the mean over the
                                      replicas (dp, × cp) complete -- whole, or ZeRO-1's slices
    scaler.unscale(gradients)         (mixed precision) the final gradients -- .grad or ZeRO's slices --
                                      divided by S into the master dtype; an inf or NaN on any rank skips
                                      the step on every rank
    norm = gradients.clip_grad_norm   the global norm, each parameter counted once over tp, pp, replicas
    optimizer.step()                  (ZeRO-1: update this rank's slices, all-gather the parameters)

The data-parallel reduction runs once per step, after each parameter's last microbatch: earlier would
average a partial sum, every microbatch would send the same bytes m times. Under a schedule each stage
reduces right after its own last backward -- in 1F1B the last stage finishes first, and its reduction
overlaps stage 0's draining backwards.

``gradients`` is a synchronisation (``minitp.parallel.data.sync``): ``AllReduceGradients`` (plain, blocking
or ``overlap``), or an optimizer that brings its own (``optimizer.gradient_sync``: ZeRO-1's
``ZeroOptimizer``). Without either, a blocking ``AllReduceGradients`` is made for the call.
"""
import numpy

from minitp import trace
from minitp.nn.optim import check_max_norm
from minitp.parallel.data.data_parallel import average_over_data_parallel, replicas
from minitp.parallel.data.sync import AllReduceGradients
from minitp.training.forward_backward import whole_batch


def check_train_step(model, optimizer, gradients, forward_backward, mesh, batch, max_norm=None, scaler=None):
    """``ValueError`` -- the same on every rank, since every rank checks the same objects and numbers --
    for a step that would run silently wrong or hang, before anything is sent:

    - a ``max_norm`` that is not positive;
    - a mesh with pp > 1 run as a whole batch: a stage holds only its layers, and needs a schedule
      (``Pipelined``) to receive its inputs from the stage before;
    - a schedule that cannot run this batch on this mesh (``pipeline.check_step``);
    - ``gradients=`` beside an optimizer that brings its own synchronisation (ZeRO-1 reduce-scatters
      ``.grad`` itself: both would take the same gradients);
    - a synchronisation over another group than ``replicas(mesh)``: the gradient of the global batch is
      the mean over every rank holding a copy of the parameters -- dp, and with cp > 1 dp × cp (each cp
      rank holds other tokens); over dp alone the other cp ranks' tokens would be missing;
    - an optimizer with its own synchronisation (ZeRO) on a model whose parameters reduce over another
      group than the replicas (``p.replica_group``: a mixture's experts): it would shard them over the
      wrong ranks (not built);
    - loss scaling beside an optimizer without master weights (``master_dtype``): the unscaled
      gradients need a dtype wider than the model's (in fp16 the division would underflow again).
    """
    check_max_norm(max_norm)
    pipelined = getattr(forward_backward, "pipelined", False)
    own = getattr(optimizer, "gradient_sync", None)
    expected = replicas(mesh)
    if mesh is not None and mesh.pp_size > 1 and not pipelined:
        raise ValueError(f"a mesh with pp = {mesh.pp_size} holds pipeline stages: each rank has only its "
                         "layers and receives its input from the stage before, so the step needs a "
                         "schedule: forward_backward=Pipelined(schedule, microbatches)")
    if pipelined:
        forward_backward.check(model, mesh, batch)
    if gradients is not None and own is not None:
        raise ValueError(f"gradients= is for a plain optimizer: {type(optimizer).__name__} synchronises the "
                         "gradients itself (ZeRO-1 reduce-scatters them into the slices it updates), and the "
                         "two would take the same .grad")
    sync = gradients if gradients is not None else own
    group = getattr(sync, "group", None)
    # serial (both None) or the same ranks: anything else averages over ranks that are not the replicas
    same = group.ranks == expected.ranks if group is not None and expected is not None else group is expected
    if sync is not None and not same:
        where = "one process (mesh=None)" if expected is None else f"{expected.name} (world ranks {list(expected.ranks)})"
        got = "no group" if group is None else f"{group.name} (world ranks {list(group.ranks)})"
        raise ValueError(f"the gradient synchronisation reduces over {got}, but on this mesh the parameters "
                         f"are replicated over {where}: the gradient of the global batch is the mean over "
                         "every rank holding a copy -- dp, and with cp > 1 dp × cp (each cp rank holds other "
                         "tokens). Build it on the step's mesh")
    if own is not None and expected is not None and any(
            getattr(p, "replica_group", expected).ranks != expected.ranks for p in model.parameters()):
        raise ValueError(f"{type(optimizer).__name__} shards every gradient over {expected.name}, but this model's "
                         "expert weights are reduced over mesh.expert_dp (p.replica_group): ZeRO with experts "
                         "spread over ep is not built; use AllReduceGradients")
    if scaler is not None and getattr(optimizer, "master_dtype", None) is None:
        raise ValueError(f"loss scaling needs master weights to unscale into: {type(optimizer).__name__} has none "
                         "(MasterWeights(optimizer, numpy.float32), or ZeroOptimizer / FullyShardedOptimizer "
                         "with master_dtype=numpy.float32)")


def train_step(model, optimizer, ids, targets, mesh=None, *, max_norm=None, gradients=None,
               forward_backward=whole_batch, scaler=None):
    """One step on the global batch ``ids``, ``targets`` (s, B), every rank passing the same arrays;
    returns (the global batch's loss, the gradient norm before clipping), the same on every rank.

    ``model``: ``nn.GPT`` (``mesh=None``: the serial step), ``ParallelGPT``, or this rank's
    ``PipelineGPT`` stage with ``forward_backward=Pipelined(schedule, m)``. ``gradients``: the
    synchronisation (module docstring). What would go wrong is refused first (``check_train_step``).
    While a trace is recorded, the step and its phases are "phase" spans.

    ``scaler``: a ``minitp.nn.loss_scale.DynamicLossScaler`` beside a ``MasterWeights`` optimizer (mixed
    precision), or a ZeRO optimizer of any stage with ``master_dtype``: backward from the scaled loss, the
    gradients unscaled into the master dtype after their synchronisation (the ``.grad`` arrays, or ZeRO's
    slices: ``gradients.map_gradients``) and before the clip; a gradient that is inf or NaN on any rank
    skips the step on every rank (the norm returned is then inf, and nothing changed).
    """
    check_train_step(model, optimizer, gradients, forward_backward, mesh, ids.shape[1], max_norm, scaler)
    if gradients is None:
        gradients = getattr(optimizer, "gradient_sync", None) or AllReduceGradients(model, mesh)
    with trace.span("step", "phase"):
        optimizer.zero_grad()
        gradients.start_step(forward_backward.microbatches)
        if scaler is None:
            loss = forward_backward(model, ids, targets, mesh)
        else:  # an overflow is expected now and then: the scaler finds it and skips the step, numpy need not warn
            with numpy.errstate(over="ignore", invalid="ignore"):
                loss = forward_backward(model, ids, targets, mesh, scale=scaler.scale)
        with trace.span("optimizer", "phase"):
            with trace.span("gradients: finish", "compute"):
                gradients.finish()
            if scaler is not None:  # the final gradients of any synchronisation: .grad, or ZeRO's slices
                overflow = scaler.unscale(gradients, optimizer.master_dtype, None if mesh is None else mesh.world.comm)
                scaler.update(overflow)
                if overflow:  # every rank alike: skip the step, the scale already halved
                    optimizer.zero_grad()
                    return average_over_data_parallel(loss, mesh), float("inf")
            with trace.span("clip_grad_norm", "compute"):
                norm = gradients.clip_grad_norm(max_norm)
            with trace.span("optimizer.step", "compute"):
                optimizer.step()
    return average_over_data_parallel(loss, mesh), norm
