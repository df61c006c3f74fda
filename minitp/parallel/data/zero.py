"""ZeRO stage 1: each data-parallel replica keeps the optimizer state of 1/d of the parameters only
(Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", P_os;
Megatron's distributed optimizer; nanotron's ``optim/zero.py``).

Plain data parallelism keeps d copies of everything: every replica holds AdamW's two moments for every
parameter, 2·Ψ numbers, although every replica computes exactly the same update. ZeRO-1 cuts that work
and that state into d slices, using the flat buckets of ``minitp.parallel.data.buckets``:

    reduce-scatter the gradients     dp rank r receives its slice [r·n/d, (r+1)·n/d) of each bucket's mean
    clip by the global norm          squares of the slices, summed over dp (and the split ones over tp)
    update its slice only            AdamW on those n/d elements, with their n/d moments
    all-gather the parameters        every replica holds every updated parameter again

The flat buckets (not the parameters' own axes) are what is split: a bucket of n elements is padded to
d·⌈n/d⌉ and rank r takes [r·⌈n/d⌉, (r+1)·⌈n/d⌉). What crosses the wire: gradients (reduce-scatter) and
parameters (all-gather), one of each per bucket, plus the norm's two numbers; never the moments.

**Context parallelism.** With cp > 1 the parameters are replicated over dp × cp, and each cp rank
holds the gradient of other tokens: the gradient of the global batch is the mean over all d = dp·cp
ranks (``data_parallel.replicas``). So ZeRO-1 shards over that group: d = dp·cp slices, the same
reduce-scatter, norm and all-gather, over ``mesh.dp_cp``. (Over dp alone the other cp ranks' tokens
would be missing from the mean: the gradient, its norm and the update silently wrong.)

**Bytes.** A ring reduce-scatter sends (d-1)/d·S per rank and a ring all-gather (d-1)/d·S more: together
2(d-1)/d·S, exactly one all-reduce's (which *is* a reduce-scatter followed by an all-gather). ZeRO-1 moves
the all-gather half from the gradients to the parameters, and the optimizer works in between, on 1/d of
the numbers. **Memory.** The moments of rank r are 1/d of plain data parallelism's: over the d ranks they
add up to exactly the plain figure (the padding that makes d divide a bucket has no state).

**Exactness.** AdamW is elementwise, so updating a slice of a flat buffer is the plain update of those
elements: each slice of a parameter keeps the parameter's own step count, and a parameter that got no
gradient is skipped, as ``nn.AdamW`` does. The only difference from plain data parallelism is the order
in which MPI adds the replicas' gradients (rounding, ~1e-16).

``ZeroOptimizer`` wraps an optimizer built as usual (``AdamW(model.named_parameters(), lr=...)``): it
takes its parameters, keys (the serial names) and its elementwise update, and keeps the state itself.
Checkpoints hold the full state under the serial names (``gathered()``: an all-gather over the group), and
``load_state_dict`` takes full arrays and keeps this rank's slices: a run resumes on any dp and tp.
"""
import math
import types

import numpy

from minitp import backend, comm
from minitp.nn.optim import check_max_norm, clip_coefficient
from minitp.parallel.data.buckets import DEFAULT_BUCKET_BYTES, GradientBuckets
from minitp.parallel.data.data_parallel import replicas
from minitp.parallel.tensor.shard import split_axis


class ZeroOptimizer:
    """``optimizer``'s update, sharded over the ranks the parameters are replicated over (ZeRO-1):
    ``mesh.dp``, or ``mesh.dp_cp`` (dp × cp) with context parallelism -- ``self.group``.
    ``overlap=True``: the gradients' reduce-scatters start during backward, bucket by bucket
    (``GradientBuckets``).

    It is its own gradient synchronisation (``sync.py``'s interface; ``gradient_sync`` is itself): per
    step, ``start_step(m)``, the forward-backward, ``finish()`` (this rank's slices of the mean gradient),
    ``clip_grad_norm(max_norm)``, ``step()`` (update the slices, all-gather the parameters);
    ``minitp.training.train_step`` does exactly that. On a pipeline stage it holds that stage's
    parameters: the norm adds the stages' squares over pp, the tied table's copy on the last stage
    counted once, and the table's gradient is summed over the two ends before it is reduce-scattered.
    """

    stage = 1

    def __init__(self, optimizer, mesh, bucket_bytes=DEFAULT_BUCKET_BYTES, overlap=False, stage=1):
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer is ZeRO stage 1 or 2, not {stage!r} (stage 3: "
                             "minitp.parallel.data.zero3.FullyShardedOptimizer)")
        self.optimizer, self.mesh, self.stage = optimizer, mesh, stage
        self.group = replicas(mesh)  # dp, or dp × cp: every rank holding a copy of the parameters
        self.keys, self.params = optimizer.keys, optimizer.params
        # stage 2: each bucket reduce-scattered inside backward as soon as it is complete (buckets.py)
        self.gradients = GradientBuckets(self.params, self.group, bucket_bytes, shard=True, overlap=overlap,
                                         eager=stage == 2)
        self._setup()

    def _setup(self):
        self.key_of = {id(p): key for key, p in zip(self.keys, self.params)}
        d, r = self.group.size, self.group.rank
        self.pieces = [bucket.pieces(r, d) for bucket in self.gradients.buckets]
        self.step_count = 0
        self.steps = {key: 0 for key in self.keys}  # every parameter's update count, on every rank
        self.state = {}  # key -> {buffer: this rank's slice of it, flat}, made at the first update

    # -- the step ---------------------------------------------------------------------------------

    @property
    def gradient_sync(self):
        """ZeRO-1's gradients are reduce-scattered into the slices its step updates: it is its own sync."""
        return self

    @property
    def lr(self):
        """The wrapped optimizer's learning rate: its ``_update`` is what runs on the slices, and it reads
        its own ``lr``. One place holds it, so a schedule setting ``optimizer.lr`` every step (ZeRO or
        not) changes the rate the update uses, and a checkpoint of either has nothing extra to keep."""
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    def start_step(self, microbatches=1):
        self.gradients.start_step(microbatches)

    def finish(self):
        """After the step's last backward: this rank's slices of the mean gradient (``grad_shards``)."""
        self.gradients.wait()

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def clip_grad_norm(self, max_norm, eps=1e-6):
        """The 2-norm of the whole (serial) model's mean gradient, from this rank's slices; scale the
        slices by ``nn.optim.clip_coefficient(norm, max_norm)`` -- max_norm / (norm + eps) whenever that
        is below 1, the rule ``data_parallel.clip_grad_norm`` follows too. Squares in float64: a split
        parameter's are summed over dp (× cp) and tp, a replicated one's over dp (× cp) only (each tp
        rank holds the same slices of it), and the stages' totals over pp (the last stage's copy of a
        tied table, ``tied_copy``, left out: the first stage counts it). One all-reduce of two numbers
        over ``self.group``, one of one number over tp, one over pp. ``ValueError`` before any of them for
        a max_norm that is not positive."""
        check_max_norm(max_norm)
        squares = numpy.zeros(2)  # [split, replicated]
        for bucket, pieces, shard, received in zip(self.gradients.buckets, self.pieces,
                                                   self.gradients.grad_shards, self.gradients.received):
            for index, _, _, lo, hi in pieces:
                if received[index] and not getattr(bucket.parameters[index], "tied_copy", False):
                    g = shard[lo:hi].astype(numpy.float64, copy=False)
                    replicated = split_axis(bucket.parameters[index]) is None
                    squares[1 if replicated else 0] += float(backend.array_module(g).vdot(g, g))
        squares = comm.all_reduce(squares, self.group, tag="grad norm (ZeRO slices)")
        split, replicated = float(squares[0]), float(squares[1])
        if self.mesh.tp.size > 1:
            split = float(comm.all_reduce(numpy.array([split]), self.mesh.tp, tag="grad norm")[0])
        total = split + replicated
        if self.mesh.pp_size > 1:
            total = float(comm.all_reduce(numpy.array([total]), self.mesh.pp, tag="grad norm (stages)")[0])
        norm = math.sqrt(total)
        scale = clip_coefficient(norm, max_norm, eps)  # the one rule, shared with data_parallel.clip_grad_norm
        if scale < 1:
            self.gradients.grad_shards = [shard * scale for shard in self.gradients.grad_shards]
        return norm

    def step(self):
        """Update this rank's slice of every bucket, then all-gather the parameters over ``self.group``
        (with ``overlap``, each bucket's all-gather starts as soon as its slice is updated)."""
        self.step_count += 1
        gathering = []  # per bucket: a function returning its gathered parameters
        for index, (bucket, pieces) in enumerate(zip(self.gradients.buckets, self.pieces)):
            received, shard_grad = self.gradients.received[index], self.gradients.grad_shards[index]
            shard = self._parameter_shard(index)
            for i, a, b, s, e in pieces:
                if not received[i]:
                    continue  # no gradient reached this parameter: nn.AdamW skips it too
                key = self.key_of[id(bucket.parameters[i])]
                state = self.state.setdefault(key, {})
                state["step"] = self.steps[key] + 1  # the update count, this update included
                self.optimizer._update(shard[s:e], shard_grad[s:e], state)
            for i, received_gradient in enumerate(received):
                if received_gradient:
                    self.steps[self.key_of[id(bucket.parameters[i])]] += 1
            if self.stage == 3:
                continue  # the shard is the parameter: the next forward gathers it
            tag = f"parameters (bucket {index + 1}/{len(self.gradients.buckets)})"
            if self.gradients.overlap:  # gather this bucket while the next one is updated
                gathering.append(comm.iall_gather(shard, self.group, tag=tag).wait)
            else:
                gathering.append(lambda full=comm.all_gather(shard, self.group, axis=0, tag=tag): full)
        for bucket, gathered in zip(self.gradients.buckets, gathering):
            for p, value in zip(bucket.parameters, bucket.views(gathered())):
                p.data[...] = value

    def _parameter_shard(self, index):
        """This rank's slice of bucket ``index``'s parameters, flat: copied out of the whole parameters
        (stages 1 and 2 hold them whole; stage 3 holds the slice itself)."""
        bucket, d, r = self.gradients.buckets[index], self.group.size, self.group.rank
        lo, hi = bucket.shard_range(r, d)
        shard = backend.array_module(bucket.parameters[0].data).zeros(hi - lo, dtype=bucket.dtype)
        for i, a, b, s, e in self.pieces[index]:
            shard[s:e] = bucket.parameters[i].data.reshape(-1)[a:b]
        return shard

    @property
    def state_buffers(self):
        """The arrays kept per parameter, as the wrapped optimizer's ``state_buffers`` (a checkpoint
        must hold each of them, or none)."""
        return tuple(self.optimizer.state_buffers)

    # -- memory -----------------------------------------------------------------------------------

    def state_bytes(self):
        """The bytes of optimizer state this rank holds (its slices of every buffer)."""
        return sum(array.nbytes for entry in self.state.values() for name, array in entry.items() if name != "step")

    # -- checkpoints ------------------------------------------------------------------------------

    def gathered(self):
        """The full state, as a plain optimizer holds it: an object with ``keys``, ``params``,
        ``step_count`` and ``state`` {key: {"step": int, buffer: array of the parameter's shape}}.
        Collective over ``self.group``: one all-gather per bucket and buffer."""
        d, r = self.group.size, self.group.rank
        state = {key: {"step": self.steps[key]} for key in self.keys if self.steps[key]}
        for index, (bucket, pieces) in enumerate(zip(self.gradients.buckets, self.pieces)):
            lo, hi = bucket.shard_range(r, d)
            for name in self.state_buffers:
                shard = backend.array_module(bucket.parameters[0].data).zeros(hi - lo, dtype=bucket.dtype)
                for i, a, b, s, e in pieces:
                    entry = self.state.get(self.key_of[id(bucket.parameters[i])], {})
                    if name in entry:
                        shard[s:e] = entry[name]
                full = comm.all_gather(shard, self.group, axis=0, tag=f"optimizer state: {name} (bucket {index + 1})")
                for p, value in zip(bucket.parameters, bucket.views(full)):
                    key = self.key_of[id(p)]
                    if key in state:
                        state[key][name] = value.copy()
        return types.SimpleNamespace(keys=self.keys, params=self.params, step_count=self.step_count, state=state)

    def state_dict(self):
        """The full state (``gathered()``), as ``Optimizer.state_dict`` returns it. Collective over
        ``self.group``."""
        full = self.gathered()
        return {"step": full.step_count, "state": full.state}

    def load_state_dict(self, state_dict):
        """Take this rank's slices of the full state ``state_dict`` ({"step", "state": {key: {"step",
        buffer: array of the parameter's (tp-local) shape}}}). No communication."""
        params = dict(zip(self.keys, self.params))
        for key, entry in state_dict["state"].items():
            if key not in params:
                raise ValueError(f"ZeroOptimizer.load_state_dict: unknown parameter {key!r}")
            for name, array in entry.items():
                if name != "step" and tuple(array.shape) != params[key].shape:
                    raise ValueError(f"ZeroOptimizer.load_state_dict: {name} of parameter {key!r} has shape "
                                     f"{tuple(array.shape)}, the parameter {params[key].shape}")
        self.steps = {key: int(state_dict["state"].get(key, {}).get("step", 0)) for key in self.keys}
        self.state = {}
        for bucket, pieces in zip(self.gradients.buckets, self.pieces):
            for i, a, b, _, _ in pieces:
                key = self.key_of[id(bucket.parameters[i])]
                entry = state_dict["state"].get(key)
                if not entry or not self.steps[key]:
                    continue
                xp = backend.array_module(bucket.parameters[i].data)
                self.state[key] = {name: xp.array(backend.to_host(array) if xp is numpy else array,
                                                  dtype=bucket.dtype).reshape(-1)[a:b].copy()
                                   for name, array in entry.items() if name != "step"}
        self.step_count = int(state_dict["step"])

