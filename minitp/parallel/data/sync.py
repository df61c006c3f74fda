"""How does a step's gradient become the global batch's? One interface, whatever the mesh and strategy.

After the forward-backward of a step (the whole batch, or m microbatches through pipeline stages), each
rank holds in ``.grad`` the gradient of its own tokens' loss. A gradient synchronisation turns that into
the gradient of the loss over the global batch, and measures it for clipping:

    start_step(m)          a step of m backwards begins: reductions hooked into backward (overlap) wait
                           for each parameter's m-th gradient -- its last microbatch's
    finish()               after the last backward: the tied table summed over the pipeline's ends, then
                           every bucket's reduction over the replicas completed
    clip_grad_norm(max)    the global norm of the whole (serial) model's gradient -- each parameter
                           counted once across tp, pp and the replicas -- and the clip by it

then the optimizer steps. Two implementations, one bucket layout (``buckets.GradientBuckets``):

- ``AllReduceGradients`` (here): every bucket all-reduced and averaged over ``replicas(mesh)``; with
  ``overlap``, each bucket starts from backward's hooks as soon as it is complete (plain data
  parallelism, blocking or overlapped);
- ``zero.ZeroOptimizer`` (ZeRO-1): every bucket reduce-scattered instead, clipped from the slices, and its
  ``step`` updates this rank's slice and all-gathers the parameters -- the optimizer step is part of the
  sharding, so the optimizer *is* its synchronisation (``optimizer.gradient_sync``).

``minitp.training.train_step`` calls exactly these, for every mesh.
"""
from minitp.parallel.data.buckets import DEFAULT_BUCKET_BYTES, GradientBuckets
from minitp.parallel.data.data_parallel import clip_grad_norm, replicas


class AllReduceGradients:
    """The plain gradient synchronisation of ``model`` on ``mesh``: bucketed all-reduces over
    ``replicas(mesh)`` (dp, or dp × cp), the mean of the replicas' gradients left in ``.grad``; clipping by
    ``data_parallel.clip_grad_norm``. ``overlap=True``: each bucket's all-reduce starts during backward,
    once its last microbatch's gradients are in. ``mesh=None``: a serial model, nothing to reduce (a
    pipeline's tied table is still summed over its ends)."""

    def __init__(self, model, mesh=None, bucket_bytes=DEFAULT_BUCKET_BYTES, overlap=False):
        self.model, self.mesh = model, mesh
        group = replicas(mesh)
        self.group = group
        self.buckets = None if group is None else GradientBuckets(model.parameters(), group, bucket_bytes,
                                                                 overlap=overlap)

    def start_step(self, microbatches=1):
        if self.buckets is not None:
            self.buckets.start_step(microbatches)

    def finish(self):
        if self.buckets is not None:
            self.buckets.wait()

    def clip_grad_norm(self, max_norm):
        return clip_grad_norm(self.model, max_norm, self.mesh)


def all_reduce_gradients(model, mesh=None, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """``AllReduceGradients(model, mesh, bucket_bytes).finish()`` in one call, for a loop of its own:
    ``.grad`` becomes the mean over the replicas (dp, × cp), a pipeline's tied table summed over its ends
    first. Returns the number of buckets all-reduced over the replicas (0 when there is one replica)."""
    sync = AllReduceGradients(model, mesh, bucket_bytes)
    sync.finish()
    return 0 if sync.group is None or sync.group.size == 1 else len(sync.buckets)
