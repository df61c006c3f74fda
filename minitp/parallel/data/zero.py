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

**Mixed precision** (``master_dtype``; Micikevicius et al. 2018, and the ZeRO paper's own setting). The
model is in a low precision (fp16 or bf16), and each rank keeps an fp32 MASTER copy of its slice only --
an optimizer state buffer ``"master"`` beside the moments, made at the slice's first update from the
slice of the parameter, so ``gathered()``, ``state_dict()``, ``load_state_dict()`` and checkpoints hold it
as they hold the moments; the moments are in the master dtype too (the state's dtype is the master
dtype, not the bucket's). The step, per slice:

    reduce-scatter the gradients     in the model's dtype (2 bytes per fp16 element on the wire), or in
                                     ``reduce_dtype`` (fp32: 4 bytes) -- ``buckets.py``
    unscale                          a loss scaler divides the slices by S into fp32 (``map_gradients``)
    clip                             by the norm of the unscaled gradient
    update the fp32 master slice     the wrapped optimizer's update, moments in fp32
    round it to the model dtype      the low-precision slice rewritten from the master
    all-gather the parameters        in the model's dtype (2 bytes per fp16 element); stage 3: nothing

Memory per rank, Ψ parameters over N_d replicas, K = 12 (fp32 master + AdamW's two fp32 moments) -- the
ZeRO paper's formulas: stage 1 2Ψ + 2Ψ + KΨ/N_d, stage 2 2Ψ + (2+K)Ψ/N_d, stage 3 (2+2+K)Ψ/N_d (plus the
padding, fewer than N_d elements per bucket, which the paper does not count).

Say it with ``master_dtype=numpy.float32`` on the plain optimizer (``ZeroOptimizer(AdamW(...), mesh,
master_dtype=numpy.float32)``). A ``MasterWeights`` optimizer is refused: it keeps master copies of every
parameter, Ψ of them, where ZeRO keeps Ψ/N_d.
"""
import math
import types

import numpy

from minitp import backend, comm
from minitp.nn.master_weights import MasterWeights, master_of
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

    ``master_dtype`` (e.g. ``numpy.float32`` for an fp16 model): the update runs on a master copy of this
    rank's slice, kept in the optimizer state as ``"master"`` (module docstring); None: on the slice of
    the parameters itself. ``reduce_dtype``: the gradients reduce-scattered in that dtype, and their
    slices left in it (None: the parameters' dtype).
    """

    stage = 1

    def __init__(self, optimizer, mesh, bucket_bytes=DEFAULT_BUCKET_BYTES, overlap=False, stage=1,
                 master_dtype=None, reduce_dtype=None):
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer is ZeRO stage 1 or 2, not {stage!r} (stage 3: "
                             "minitp.parallel.data.zero3.FullyShardedOptimizer)")
        self._precision(optimizer, master_dtype)
        self.optimizer, self.mesh, self.stage = optimizer, mesh, stage
        self.group = replicas(mesh)  # dp, or dp × cp: every rank holding a copy of the parameters
        self.keys, self.params = optimizer.keys, optimizer.params
        # stage 2: each bucket reduce-scattered inside backward as soon as it is complete (buckets.py)
        self.gradients = GradientBuckets(self.params, self.group, bucket_bytes, shard=True, overlap=overlap,
                                         eager=stage == 2, reduce_dtype=reduce_dtype)
        self._setup()

    def _precision(self, optimizer, master_dtype):
        """``self.master_dtype``; ``ValueError`` (every rank checks the same object) for a ``MasterWeights``
        optimizer, whose whole-model masters ZeRO would not shard."""
        if isinstance(optimizer, MasterWeights):
            raise ValueError(f"{type(self).__name__} shards the master weights itself (1/d of them per rank): "
                             "wrap the plain optimizer and pass master_dtype=, e.g. "
                             f"{type(self).__name__}(AdamW(...), ..., master_dtype=numpy.float32), "
                             "not MasterWeights(AdamW(...)), which holds a master copy of every parameter")
        self.master_dtype = None if master_dtype is None else numpy.dtype(master_dtype)

    def state_dtype(self, param):
        """The dtype ``param``'s state buffers are kept in (``Optimizer.state_dtype``'s question): the master
        dtype, else the parameter's."""
        return param.dtype if self.master_dtype is None else self.master_dtype

    def _state_dtype(self, bucket):
        return self.state_dtype(bucket.parameters[0])  # one dtype per bucket

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
        """Drop every ``.grad`` and the last step's slices: kept until the next ``finish()``, they would sit
        beside the next backward's gradients (and, unscaled, in the master dtype: 4 bytes per element)."""
        for p in self.params:
            p.grad = None
        self.gradients.grad_shards = [None] * len(self.gradients.grad_shards)

    def final_gradients(self):
        """The final gradients after ``finish()`` (``sync.py``'s interface): this rank's slices."""
        return [shard for shard in self.gradients.grad_shards if shard is not None]

    def map_gradients(self, fn):
        """Each slice of the mean gradient replaced by ``fn(slice)`` (a loss scaler's unscaling)."""
        self.gradients.grad_shards = [None if shard is None else fn(shard) for shard in self.gradients.grad_shards]

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
        (with ``overlap``, each bucket's all-gather starts as soon as its slice is updated). With
        ``master_dtype`` the update is of the master slice, and the parameters' slice its rounding; the
        all-gather is in the parameters' dtype either way."""
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
                if self.master_dtype is None:
                    self.optimizer._update(shard[s:e], shard_grad[s:e], state)
                    continue
                master = self._master(state, shard[s:e])
                # widening an fp16 gradient is exact; a scaler's unscaled slice is in the master dtype already
                self.optimizer._update(master, shard_grad[s:e].astype(self.master_dtype, copy=False), state)
                shard[s:e] = master  # rounded to the model's dtype: what is gathered (stage 3: kept)
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

    def _master(self, state, piece):
        """The master copy of one parameter's piece of this rank's slice (``master_weights.master_of``: made
        at its first update, kept from then on -- an fp16 weight of 1.0 does not move by 1e-4; its fp32
        master does)."""
        return master_of(state, piece, self.master_dtype)

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
        must hold each of them, or none), and ``"master"`` with a ``master_dtype``."""
        return tuple(self.optimizer.state_buffers) + (() if self.master_dtype is None else ("master",))

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
                shard = backend.array_module(bucket.parameters[0].data).zeros(hi - lo, dtype=self._state_dtype(bucket))
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
        buffer: array of the parameter's (tp-local) shape}}}), in the state's dtype (the master dtype, or the
        parameters'). Buffers other than ``state_buffers`` are left out: a ``"master"`` loaded without a
        ``master_dtype`` would never be read (the parameters, rounded from it, are the weights then).
        ``ValueError`` with a ``master_dtype`` for an updated parameter whose state has no ``"master"``.
        No communication."""
        params = dict(zip(self.keys, self.params))
        for key, entry in state_dict["state"].items():
            if key not in params:
                raise ValueError(f"ZeroOptimizer.load_state_dict: unknown parameter {key!r}")
            for name, array in entry.items():
                if name != "step" and tuple(array.shape) != params[key].shape:
                    raise ValueError(f"ZeroOptimizer.load_state_dict: {name} of parameter {key!r} has shape "
                                     f"{tuple(array.shape)}, the parameter {params[key].shape}")
        missing = [key for key, entry in state_dict["state"].items()
                   if self.master_dtype is not None and "master" not in entry and int(entry.get("step", 0))]
        if missing:  # MasterWeights' rule too: remade from the rounded weights, the run would drift
            raise ValueError(f"ZeroOptimizer.load_state_dict: no master weights for parameter(s) {missing[:4]} (a "
                             "plain optimizer's state?): with master_dtype they would be remade from the rounded "
                             "weights")
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
                                                  dtype=self._state_dtype(bucket)).reshape(-1)[a:b].copy()
                                   for name, array in entry.items() if name in self.state_buffers}
        self.step_count = int(state_dict["step"])

