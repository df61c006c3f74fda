"""The loss of a batch without training on it: a held-out loss, whatever the mesh.

Forward only, under ``no_grad`` (no graph, nothing kept for a backward) and in eval mode (dropout off:
the held-out loss measures the model, not a random mask; the dropouts' counters do not move, so an
evaluation leaves the training's masks -- and its losses -- exactly as without it). No gradient is
touched, so no gradient synchronisation (overlapped buckets, ZeRO-2's reduce-scatters inside backward)
is triggered either.

- ``ParallelGPT`` / ``nn.GPT``: this replica's slice in one forward.
- ``PipelineGPT`` (``microbatches`` > 1 or pp > 1): the schedule's own plan with its backwards left out.
  Removing actions only removes waits: every forward still receives its input from the stage before,
  sent by that stage's forward, so the order that never deadlocks with the backwards never does without
  them. The loss is the last stage's, broadcast over pp, as in a training step.

Every rank returns the global batch's loss (the mean over the replicas).
"""
import numpy

from minitp import comm
from minitp.autograd import no_grad
from minitp.parallel.data.data_parallel import average_over_data_parallel, split_batch
from minitp.pipeline import engine
from minitp.pipeline.schedules import plan


def evaluate_loss(model, ids, targets, mesh=None, schedule=None, microbatches=1):
    """The loss of the global batch ``ids``, ``targets`` (s, B), every rank passing the same arrays.
    ``schedule``: the pipeline schedule a ``PipelineGPT`` stage trains with (None: a whole-batch model)."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            if schedule is None:
                loss = model.loss(split_batch(ids, mesh), split_batch(targets, mesh)).item()
            else:
                loss = _pipelined_loss(model, ids, targets, mesh, schedule, microbatches)
    finally:
        model.train(was_training)
    return average_over_data_parallel(loss, mesh)


def _pipelined_loss(model, ids, targets, mesh, schedule, microbatches):
    """This replica's loss through the stages: the forwards of the plan, in its order."""
    forwards = [action for action in plan(schedule, mesh.pp_size, microbatches, model.virtual_stages, mesh.pp_rank)
                if action.kind == "F"]
    run = engine.run(model, forwards, split_batch(ids, mesh), split_batch(targets, mesh), microbatches)
    loss = numpy.array([run.loss if run.loss is not None else 0.0])
    return float(comm.broadcast(loss, mesh.pp, root=mesh.pp_size - 1, tag="held-out loss (from the last stage)")[0])
