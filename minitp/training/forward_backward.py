"""How does a step run its forwards and backwards? Two ways, one signature.

A forward-backward is called as ``fb(model, ids, targets, mesh)`` on the global batch (s, B) -- every
rank passes the same arrays -- leaves this rank's gradients in ``.grad``, and returns this rank's loss:
the mean over its own tokens (its replica's columns, its sequence block under context parallelism). Its
``microbatches`` says how many backwards each parameter sees, which the gradient synchronisation needs
to know when a gradient is final.

- ``whole_batch``: the replica's slice in one forward and one backward (``ParallelGPT``, ``nn.GPT``).
- ``Pipelined(schedule, microbatches)``: m microbatches through the stages of a ``PipelineGPT`` by AFAB,
  1F1B or interleaved (``minitp.pipeline``); the loss is the last stage's, broadcast over pp. With pp = 1
  it is gradient accumulation.

Both take ``scale=S`` (a loss scaler's, ``minitp.nn.loss_scale``): every gradient S times larger, the
loss returned unscaled. The whole batch multiplies the loss by S before its backward; the pipeline seeds
its last stage's backward with S/m instead of 1/m -- the same gradient, without a scaled loss tensor.
"""
from minitp import trace
from minitp.parallel.data.data_parallel import split_batch
from minitp.pipeline.schedules import SCHEDULES
from minitp.pipeline.training import check_step, forward_backward


def whole_batch(model, ids, targets, mesh=None, scale=None):
    """Forward and backward of this replica's slice of the batch at once; returns this rank's loss.
    ``scale``: backward from loss · scale (a loss scaler's S, ``minitp.nn.loss_scale``), every gradient
    S times larger; the loss returned is the unscaled one."""
    with trace.span("forward", "phase"):
        loss = model.loss(split_batch(ids, mesh), split_batch(targets, mesh))
    with trace.span("backward", "phase"):
        (loss if scale is None else loss * scale).backward()  # overlapped buckets start their reductions in here
    return loss.item()


whole_batch.microbatches = 1
whole_batch.pipelined = False


class Pipelined:
    """m microbatches through this rank's pipeline stage by ``schedule`` ("afab", "1f1b", "interleaved");
    ``scale``: a loss scaler's S, seeding the last stage's backward with S/m (``pipeline.engine``)."""

    pipelined = True

    def __init__(self, schedule="1f1b", microbatches=1):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
        self.schedule, self.microbatches = schedule, microbatches

    def check(self, model, mesh, batch):
        """``ValueError`` on every rank unless ``batch`` sequences can run by this schedule on ``mesh``."""
        check_step(mesh, batch, self.schedule, self.microbatches, model.virtual_stages)

    def __call__(self, model, ids, targets, mesh, scale=None):
        return forward_backward(model, ids, targets, mesh, self.schedule, self.microbatches, scale=scale).loss

    def __repr__(self):
        return f"Pipelined({self.schedule!r}, microbatches={self.microbatches})"
