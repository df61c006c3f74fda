"""How do a model's gradients cross the data-parallel axis? In flat buckets, each reduced once -- and, with
``overlap``, while backward is still running.

**Layout.** The parameters are taken in model order and cut into consecutive runs of one dtype and at
most ``bucket_bytes`` (a parameter larger than that gets a bucket of its own). A bucket is one flat
buffer: parameter i occupies [offset_i, offset_i + size_i). The layout is a function of the parameters'
shapes alone, so every replica builds the same one. One collective per bucket instead of one per tensor:
a model has hundreds of tensors, and each collective pays MPI's latency once.

**Plain data parallelism** (``shard=False``): each bucket is all-reduced (a sum), divided by d, and every
``.grad`` becomes a view of the mean -- the gradient of the loss over the global batch.

**ZeRO-1** (``shard=True``): each bucket is reduce-scattered instead, and dp rank r receives only its
shard of the mean, the contiguous range [r·n/d, (r+1)·n/d) of the flat buffer; ``minitp.parallel.data.zero``
updates that range and all-gathers the parameters. So that d divides n, a sharded bucket is padded at
its end with zeros up to a multiple of d: fewer than d elements per bucket, which add nothing to a sum
or a norm, have no parameter, and so no optimizer state.

**Overlap** (``overlap=True``): a hook on every parameter (``register_post_accumulate_grad_hook``; the
engine calls it as soon as that gradient is final) counts the bucket's gradients, and when the last one
arrives, packs the bucket and *starts* its reduction (``comm.iall_reduce`` / ``comm.ireduce_scatter``)
while backward goes on into the layers below. ``wait()``, called before the optimizer, starts whatever
has not started -- a bucket holding a parameter that received no gradient: zeros in its slot, and its
``.grad`` stays None (every replica ran the same graph, so every replica agrees) -- and waits for all.
Buckets start in the order their gradients complete, the same on every replica (the same graph), which
is what MPI needs of collectives on one communicator.

**Microbatches** (a pipeline schedule, or gradient accumulation): a parameter's gradient is the sum of its
m microbatches' parts, complete only after its m-th backward. ``start_step(m)`` says how many to wait
for: a bucket starts when each of its parameters has been hooked m times -- once, after the last
microbatch's backward, as Megatron's and DDP's ``no_sync`` do for all the others. Reducing earlier
would average a partial sum; reducing every microbatch would send the same bytes m times.

**A tied table** (``tied_group``: the wte that a pipeline's first and last stage each hold a copy of)
needs the sum of both stages' gradients before its mean over the replicas. Its own bucket never starts
from a hook: ``wait()`` first all-reduces it over its ``tied_group``, then reduces its bucket. (The two
sums commute, but starting it from a hook would make the last stage wait, mid-backward, for the first
stage's last backward -- which waits for the last stage's gradient sends: a deadlock.)

Without overlap, ``wait()`` packs and reduces every bucket with the blocking collectives.

**The dtype on the wire** (``reduce_dtype``). A bucket is packed, reduced and averaged in the parameters'
dtype by default -- fp16 gradients cross the wire as fp16, 2 bytes per element, as Megatron's do. With
``reduce_dtype=numpy.float32`` the low-precision gradients are widened as they are packed (exact: every
fp16 is an fp32), summed and averaged in fp32 (4 bytes per element on the wire: twice the bytes, no
rounding of the sum to fp16), and what is left is fp32: the ``.grad`` views (plain) or the slices
(``grad_shards``, ZeRO). On one replica nothing is reduced, but the gradients are still left in
``reduce_dtype``, so what follows sees one dtype whatever the mesh.

**ZeRO-2** (``eager=True``, with ``shard``): each bucket is reduce-scattered from backward's hooks as soon
as it is complete, blocking or (``overlap``) started, and its full gradient dies there -- the ``.grad``
arrays at packing, the packed bucket when its reduce-scatter completes. With ``overlap`` at most two
buckets are in flight: starting one waits for the one before. Without ``eager`` (ZeRO-1) the packed
buckets of an overlapped step live until ``wait()``, and a blocking step keeps every ``.grad`` until
then: the whole gradient exists at the end of backward, as in the paper's stage 1.
"""
import math

import numpy

from minitp import backend, comm, trace

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20
"""torch DDP's default bucket size: large enough that the reductions are bandwidth-bound."""


class Bucket:
    """Consecutive parameters of one dtype in one flat buffer of ``size`` elements (``padded`` with the
    zeros that make it divide over the shards)."""

    def __init__(self, parameters, shards):
        self.parameters = parameters
        self.offsets = [0]
        for p in parameters:
            self.offsets.append(self.offsets[-1] + p.size)
        self.size = self.offsets.pop()
        self.padded = math.ceil(self.size / shards) * shards
        self.dtype = parameters[0].dtype

    def shard_range(self, rank, shards):
        """[lo, hi): the flat elements of dp rank ``rank``'s shard."""
        length = self.padded // shards
        return rank * length, (rank + 1) * length

    def pieces(self, rank, shards):
        """(parameter index, [a, b) of its flat elements, [lo, hi) in the shard) for each parameter that
        overlaps the shard of ``rank``."""
        first, last = self.shard_range(rank, shards)
        found = []
        for index, (p, offset) in enumerate(zip(self.parameters, self.offsets)):
            lo, hi = max(first, offset), min(last, offset + p.size)
            if lo < hi:
                found.append((index, lo - offset, hi - offset, lo - first, hi - first))
        return found

    def pack(self, arrays, dtype=None):
        """One flat buffer of ``arrays`` (one per parameter, or None: zeros there), padding zeroed, in
        ``dtype`` (None: the parameters' own)."""
        xp = backend.array_module(next((a for a in arrays if a is not None), backend.xp.zeros(0)))
        flat = xp.zeros(self.padded, dtype=self.dtype if dtype is None else dtype)
        for array, p, offset in zip(arrays, self.parameters, self.offsets):
            if array is not None:  # a copy into its slot: a gradient may be a read-only broadcast view
                flat[offset:offset + p.size].reshape(p.shape)[...] = array
        return flat

    def views(self, flat):
        """Each parameter's slot of the flat buffer ``flat``, in the parameter's shape."""
        return [flat[offset:offset + p.size].reshape(p.shape) for p, offset in zip(self.parameters, self.offsets)]


class GradientBuckets:
    """The reduction of ``parameters``' gradients over ``group`` (``mesh.dp``), bucket by bucket.

    ``shard=False``: after ``wait()`` every ``.grad`` is the mean over the replicas. ``shard=True``
    (ZeRO-1): after ``wait()``, ``grad_shards[i]`` is this rank's shard of bucket i's mean, and
    ``received[i]`` says which of its parameters had a gradient; the ``.grad`` arrays are dropped as
    soon as they are packed (the mean exists only as slices, and a whole gradient left in ``.grad``
    would be this replica's alone). ``overlap=True``: reductions start
    during backward. ``reduce_dtype``: the dtype the buckets are packed, reduced and left in (None: the
    parameters'; module docstring). ``ValueError`` (on every rank: every rank checks the same number) unless
    ``bucket_bytes`` > 0.
    """

    def __init__(self, parameters, group, bucket_bytes=DEFAULT_BUCKET_BYTES, shard=False, overlap=False,
                 eager=False, reduce_dtype=None):
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, float)) or not bucket_bytes > 0:
            raise ValueError(f"the bucket size must be a positive number of bytes, not {bucket_bytes!r}")
        if eager and not shard:
            raise ValueError("eager reduction (ZeRO-2) is of sharded buckets: pass shard=True")
        self.group, self.shard, self.overlap, self.eager = group, shard, overlap, eager
        self.reduce_dtype = None if reduce_dtype is None else numpy.dtype(reduce_dtype)
        parameters = [p for p in parameters if p.requires_grad]
        self.tied = [p for p in parameters if getattr(p, "tied_group", None) is not None]
        # the tied table last and alone: its bucket waits for the stages' sum (see the module docstring)
        self.parameters = [p for p in parameters if p not in self.tied] + self.tied
        shards = group.size if shard else 1
        self.buckets = _layout(self.parameters[:len(self.parameters) - len(self.tied)], bucket_bytes, shards)
        self.deferred = len(self.buckets)  # buckets from this index on start only in wait()
        self.buckets += _layout(self.tied, bucket_bytes, shards)
        self.where = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket.parameters}
        self.accumulations = 1  # backwards per step: start_step(m)
        self.grad_shards, self.received = [None] * len(self.buckets), [None] * len(self.buckets)
        self._arrived = [0] * len(self.buckets)
        self._pending = [None] * len(self.buckets)
        self._done = [False] * len(self.buckets)  # ZeRO-2: reduced inside this step's backward
        self._hooks = []
        self._in_flight = None  # ZeRO-2 with overlap: the bucket started last, waited when the next starts
        if eager or (overlap and group.size > 1):  # ZeRO-2 reduces inside backward, even over one rank
            self._hooks = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in self.parameters]

    def __len__(self):
        return len(self.buckets)

    def _tag(self, index):
        return f"gradients (bucket {index + 1}/{len(self.buckets)})"

    def start_step(self, microbatches=1):
        """A new step of ``microbatches`` backwards: each parameter's gradient is final at its
        ``microbatches``-th hook, and only then may its bucket start."""
        self.accumulations = microbatches
        self._arrived = [0] * len(self.buckets)

    def _gradient_ready(self, parameter):
        index = self.where[id(parameter)]
        self._arrived[index] += 1
        expected = len(self.buckets[index].parameters) * self.accumulations
        if self._arrived[index] > expected:
            raise RuntimeError(f"a gradient completed more often than the {self.accumulations} backward(s) "
                               "this step was started for: call start_step(microbatches) before the step's "
                               "first backward, and wait() after its last")
        if self._arrived[index] == expected and index < self.deferred:
            self._start(index)

    def _packed(self, index):
        bucket = self.buckets[index]
        self.received[index] = [p.grad is not None for p in bucket.parameters]
        with trace.span("pack bucket", "compute"):
            flat = bucket.pack([p.grad for p in bucket.parameters], self.reduce_dtype)
        if self.shard:  # this replica's whole gradients are in the bucket now, and no one needs them after it
            for p in bucket.parameters:
                p.grad = None
        return flat

    def _start(self, index):
        if self.eager:
            return self._reduce_now(index)
        flat = self._packed(index)
        if self.shard:
            self._pending[index] = comm.ireduce_scatter(flat, self.group, tag=self._tag(index))
        else:
            self._pending[index] = comm.iall_reduce(flat, self.group, tag=self._tag(index))

    def _reduce_now(self, index):
        """ZeRO-2: this bucket's reduce-scatter, inside backward; its full gradient freed when it completes."""
        flat = self._packed(index)
        if not self.overlap:
            self._finished(index, comm.reduce_scatter(flat, self.group, tag=self._tag(index)))
            return
        if self._in_flight is not None:  # at most two buckets' full gradients on the wire
            before, self._in_flight = self._in_flight, None
            self._finished(before, self._pending[before].wait())
            self._pending[before] = None
        self._pending[index] = comm.ireduce_scatter(flat, self.group, tag=self._tag(index))
        self._in_flight = index

    def _finished(self, index, reduced):
        reduced /= self.group.size  # a new array: ours to scale in place
        self.grad_shards[index] = reduced
        self._done[index] = True

    def wait(self):
        """Finish every bucket's reduction (starting those not started); see the class docstring for
        what then holds the mean. Returns the number of buckets. A tied table's gradient is first summed
        over its ``tied_group`` (the first and last stage; tagged "tied embedding")."""
        for p in self.tied:
            if p.grad is not None:
                p.grad = comm.all_reduce(p.grad, p.tied_group, tag="tied embedding")
        if not self.shard and self.group.size == 1:
            if self.reduce_dtype is not None:  # nothing to reduce, but the dtype promised all the same
                for p in self.parameters:
                    if p.grad is not None:
                        p.grad = p.grad.astype(self.reduce_dtype, copy=False)
            self._arrived = [0] * len(self.buckets)
            return len(self.buckets)  # one replica: its gradient is the mean already
        self._in_flight = None
        for index, bucket in enumerate(self.buckets):
            pending, self._pending[index] = self._pending[index], None
            if self._done[index]:  # ZeRO-2: reduce-scattered during backward already
                self._done[index], self._arrived[index] = False, 0
                continue
            if pending is not None:
                reduced = pending.wait()
            elif self.shard:
                reduced = comm.reduce_scatter(self._packed(index), self.group, tag=self._tag(index))
            else:  # the packed copy is ours: reduced in place, no second bucket-sized array
                flat = self._packed(index)
                reduced = comm.all_reduce(flat, self.group, tag=self._tag(index), out=flat)
            # a new array or our own packed copy: ours to scale in place
            reduced /= self.group.size
            if self.shard:
                self.grad_shards[index] = reduced
            else:
                for p, mean, had in zip(bucket.parameters, bucket.views(reduced), self.received[index]):
                    if had:
                        p.grad = mean
            self._arrived[index] = 0
        return len(self.buckets)

    def remove_hooks(self):
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _layout(parameters, bucket_bytes, shards):
    """Consecutive runs of ``parameters`` of one dtype, each at most ``bucket_bytes`` (unless one
    parameter alone is larger), as ``Bucket``s padded to a multiple of ``shards`` elements."""
    runs, size = [], 0
    for p in parameters:
        nbytes = p.size * p.dtype.itemsize
        if not runs or size + nbytes > bucket_bytes or runs[-1][0].dtype != p.dtype:
            runs.append([])
            size = 0
        runs[-1].append(p)
        size += nbytes
    return [Bucket(run, shards) for run in runs]
