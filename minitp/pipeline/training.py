"""The forward-backward of a pipeline step: this replica's slice of the batch, cut into m microbatches,
run through the stages by the schedule; gradients accumulate in .grad; the loss (on the last stage)
broadcast to every stage. What follows -- the tied table summed over the ends, the gradients averaged
over the replicas, the clip, the optimizer -- is every mesh's, ``minitp.training.train_step``
(``forward_backward=Pipelined(schedule, m)``).

**Why the dp reduction waits for the last microbatch.** A parameter's gradient is the sum of its m
microbatches' gradients, and it is complete only after the stage's last backward. Reducing earlier
would either average a partial sum (wrong: the later microbatches' parts would stay unreduced) or, done
once per microbatch, send the same bytes m times. So each stage reduces once, right after its own last
backward -- which need not wait for the other stages: in 1F1B the last stage finishes first, and its
reduce can run while stage 0 still drains its backwards (the dp groups of different stages share no
rank). Megatron and torch's DDP do the same (``no_sync`` for all but the last microbatch).

``schedule`` is "afab", "1f1b" or "interleaved" (with the model built with ``virtual_stages`` chunks
per rank); every bad choice is refused on every rank before anything is sent.
"""
import numpy

from minitp import comm
from minitp.nn.microbatch import microbatch_size
from minitp.parallel.data.data_parallel import split_batch
from minitp.pipeline import engine
from minitp.pipeline.schedules import check, plan


def check_step(mesh, batch, schedule, microbatches, virtual_stages=1):
    """``ValueError``, the same on every rank, unless a global batch of ``batch`` sequences can run on
    ``mesh`` by ``schedule`` in ``microbatches`` with ``virtual_stages`` chunks per rank: a schedule
    that cannot run (``schedules.check``), or a batch that dp × m does not divide."""
    check(schedule, mesh.pp_size, microbatches, virtual_stages)
    replica = comm.divide(batch, mesh.dp_size, "the batch size (split over the dp replicas)")
    microbatch_size(replica, microbatches, "the batch of a data-parallel replica")


def forward_backward(model, ids, targets, mesh, schedule="1f1b", microbatches=1, deallocate=True, scale=None):
    """Run ``schedule`` on this rank's stage ``model`` (a ``PipelineGPT``) for the global batch ``ids``,
    ``targets`` (s, B), every rank passing the same arrays: this replica's columns, m microbatches.
    Returns the ``engine.StageRun``, its ``loss`` (this replica's mean) set on every stage. Gradients
    accumulate into ``.grad``; nothing is reduced over dp yet. ``deallocate=False`` keeps each sent
    output's values until its backward (to see what freeing saves). ``scale``: a loss scaler's S, the
    last stage's backward seeded with S/m (``engine.run``): every gradient S times larger, the loss
    returned unscaled; an S/m that the model's dtype cannot hold is refused on every rank before any
    send (``engine.run``'s ``check_scale``)."""
    check_step(mesh, ids.shape[1], schedule, microbatches, model.virtual_stages)
    actions = plan(schedule, mesh.pp_size, microbatches, model.virtual_stages, mesh.pp_rank)
    run = engine.run(model, actions, split_batch(ids, mesh), split_batch(targets, mesh), microbatches, deallocate,
                     scale)
    loss = numpy.array([run.loss if run.loss is not None else 0.0])
    run.loss = float(comm.broadcast(loss, mesh.pp, root=mesh.pp_size - 1, tag="loss (from the last stage)")[0])
    return run
