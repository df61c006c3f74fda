"""How does a step's gradient become the global batch's? One interface, whatever the mesh and strategy.

After the forward-backward of a step (the whole batch, or m microbatches through pipeline stages), each
rank holds in ``.grad`` the gradient of its own tokens' loss. A gradient synchronisation turns that into
the gradient of the loss over the global batch, and measures it for clipping:

    start_step(m)          a step of m backwards begins: reductions hooked into backward (overlap) wait
                           for each parameter's m-th gradient -- its last microbatch's
    finish()               after the last backward: the tied table summed over the pipeline's ends, then
                           every bucket's reduction over the replicas completed
    final_gradients()      the arrays that hold the final gradient after finish(): the ``.grad`` of
                           every parameter (plain), or this rank's slices (ZeRO's ``grad_shards``)
    map_gradients(fn)      replace each of those arrays by fn(it): how a loss scaler unscales them
                           (``minitp.nn.loss_scale``), whatever the synchronisation
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
from minitp.nn.loss_scale import ParameterGradients
from minitp.parallel.data.buckets import DEFAULT_BUCKET_BYTES, GradientBuckets
from minitp.parallel.data.data_parallel import clip_grad_norm, replicas


class AllReduceGradients:
    """The plain gradient synchronisation of ``model`` on ``mesh``: bucketed all-reduces over
    ``replicas(mesh)`` (dp, or dp × cp), the mean of the replicas' gradients left in ``.grad``; clipping by
    ``data_parallel.clip_grad_norm``. ``overlap=True``: each bucket's all-reduce starts during backward,
    once its last microbatch's gradients are in. ``mesh=None``: a serial model, nothing to reduce (a
    pipeline's tied table is still summed over its ends).

    **Parameters with their own reduction group.** A parameter may say it is replicated over fewer ranks
    than the model (``p.replica_group``: a mixture's experts, held by the dp/ep replicas of
    ``mesh.expert_dp``). The parameters are grouped by that group (``replicas(mesh)`` for the rest), one set
    of buckets each, reduced one set after the other in the same order on every rank. Every gradient is
    still the mean over the ``replicas(mesh)`` ranks' equal shares of the batch, so a set reduced over g of
    them is scaled by g/d after its mean over g: the sum over g ranks, divided by d (Megatron's
    ``expert_gradient_scaling_factor``)."""

    def __init__(self, model, mesh=None, bucket_bytes=DEFAULT_BUCKET_BYTES, overlap=False, reduce_dtype=None):
        self.model, self.mesh = model, mesh
        group = replicas(mesh)
        self.group = group
        self.sets = [] if group is None else [
            (GradientBuckets(parameters, reduced_over, bucket_bytes, overlap=overlap, reduce_dtype=reduce_dtype),
             reduced_over.size / group.size)
            for reduced_over, parameters in by_replica_group(model.parameters(), group)]
        self.buckets = self.sets[0][0] if self.sets else None  # the model's (all of it, without experts)

    def start_step(self, microbatches=1):
        for buckets, _ in self.sets:
            buckets.start_step(microbatches)

    def finish(self):
        for buckets, scale in self.sets:
            buckets.wait()
            if scale != 1:  # reduced over g of the d replicas: the mean over g, times g/d
                for p in buckets.parameters:
                    if p.grad is not None:
                        p.grad = p.grad * scale

    def final_gradients(self):
        """The final gradients after ``finish()``: every parameter's ``.grad`` (None ones left out)."""
        return ParameterGradients(self.model.parameters()).final_gradients()

    def map_gradients(self, fn):
        """Every ``.grad`` replaced by ``fn(.grad)`` (a new array: ``.grad`` may be a view of a bucket)."""
        ParameterGradients(self.model.parameters()).map_gradients(fn)

    def clip_grad_norm(self, max_norm):
        return clip_grad_norm(self.model, max_norm, self.mesh)


def all_reduce_gradients(model, mesh=None, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """``AllReduceGradients(model, mesh, bucket_bytes).finish()`` in one call, for a loop of its own:
    ``.grad`` becomes the mean over the replicas (dp, × cp), a pipeline's tied table summed over its ends
    first. Returns the number of buckets all-reduced over the replicas (0 when there is one replica)."""
    sync = AllReduceGradients(model, mesh, bucket_bytes)
    sync.finish()
    return 0 if sync.group is None or sync.group.size == 1 else len(sync.buckets)


def by_replica_group(parameters, group):
    """[(group, its parameters)]: ``parameters`` split by the group their gradient is reduced over --
    ``p.replica_group`` where a parameter says so, else ``group`` (which comes first, and is always there)
    -- each in model order. Groups are told apart by their ranks."""
    found = {group.ranks: (group, [])}
    for p in parameters:
        own = getattr(p, "replica_group", None) or group
        found.setdefault(own.ranks, (own, []))[1].append(p)
    return list(found.values())
