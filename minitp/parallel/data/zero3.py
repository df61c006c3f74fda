"""ZeRO stage 3: each data-parallel replica keeps 1/d of every parameter, gradient and optimizer state
(Rajbhandari et al. 2020, P_os+g+p; PyTorch FSDP, Zhao et al. 2023).

Each unit (``units.py``: the embeddings, each transformer block, the head) is one flat buffer of its
parameters, padded to d·⌈n/d⌉ (``buckets.Bucket``); rank r keeps only [r·⌈n/d⌉, (r+1)·⌈n/d⌉) of it -- the
slice the optimizer updates, the only copy of those numbers on this rank. A unit's life in one step:

    forward   before: all-gather the unit (each parameter becomes a view of the gathered buffer)
              during: its ops run; what they save of a parameter is packed as a name, not the array
              after:  free -- every parameter points at a placeholder again; the output is marked
    backward  before (the mark's backward, reached before any of the unit's ops): all-gather again
              during: its ops read the parameters back through the names
              after (each parameter's gradient final, ``register_post_accumulate_grad_hook``):
                      reduce-scatter the unit's gradients, drop the full ones, free the parameters
    step      AdamW on this rank's slices (ZeRO-1's update, ``zero.ZeroOptimizer``); nothing gathered

``overlap=True`` prefetches: opening unit k starts the all-gather of the next unit (k+1 in forward, k-1
in backward), and the unit's reduce-scatter stays in flight while backward goes on (one at a time).

**What is held.** Between steps a rank holds Ψ/d parameters (+ padding), nothing else of them; while a
unit computes, that unit whole (with prefetch, also the next one). The freed parameter is a read-only
broadcast of one NaN of the parameter's shape: its shape is still the parameter's (the optimizer,
checkpoints and the layers read shapes), it takes one element of memory, and any use of it by mistake
poisons the loss instead of computing with stale numbers.

**Why names, not arrays, in the graph.** A GEMM keeps its weight for dX = dY Wᵀ; if the graph held the
gathered array, freeing the parameter would free nothing. torch frees the storage under its holders
(``storage.resize_(0)``), which numpy cannot; so while a unit's forward runs, ``autograd.push_saved_hooks``
packs every saved array that is a gathered parameter (or its transpose: the tied head's wteᵀ) into
(parameter, transposed), and backward unpacks it from the parameter gathered again.

**Bytes.** Per step, per rank, with the ring's (d-1)/d: forward gathers every unit once (Ψ), backward
gathers every unit again (Ψ) and reduce-scatters every gradient (Ψ): 3·(d-1)/d·Ψ·e, 1.5 times one
all-reduce's 2·(d-1)/d·Ψ·e (Ψ counted with each unit's padding). A tied head gathers the embeddings
unit a second time in forward and in backward (E more each way, E the embeddings unit): 3Ψ + 2E.

**Exactness.** The gathered buffer holds exactly the numbers the replicas hold in plain data parallelism;
each op computes with them as it would; dropout masks are a function of (seed, counter, index), not of
where the weights came from, and recomputation re-runs a region from inside the unit's backward, when
it is gathered. So the step equals the serial step up to the order of the replicas' sum (~1e-16).

**Mixed precision** (``master_dtype``, ``reduce_dtype``: ``zero.py``'s). The slice a rank keeps IS the
parameters' storage, in the model's low precision: that is what is all-gathered (2 bytes per fp16
element). The fp32 master slice is extra optimizer state (``"master"``); after each update the
low-precision slice is rewritten from it. The gradients are reduce-scattered in the model's dtype, or in
``reduce_dtype``. Per rank: (2 + 2 + K)·Ψ/d bytes between steps, K = 12 with fp32 AdamW.

**What it composes with.** tp, SP, cp (sharded over ``replicas(mesh)``: dp, or dp × cp), recomputation,
overlap, tied embeddings. Pipeline stages (pp > 1) are refused: see ``check_mesh``.
"""
import contextlib
import math

from minitp import autograd, backend, comm, trace
from minitp.autograd import Function
from minitp.parallel.data.buckets import Bucket
from minitp.parallel.data.data_parallel import replicas
from minitp.parallel.data.units import gpt_units
from minitp.parallel.data.zero import ZeroOptimizer


def check_mesh(mesh):
    """``ValueError`` (every rank checks the same mesh, before anything is sent) where stage 3 cannot be
    what it claims:

    - no mesh: there are no replicas to shard over;
    - pp > 1: a stage runs its m microbatches' forwards and backwards interleaved (1F1B), so a unit's
      gradient is the sum of m parts, complete only at its m-th backward. Sharding it then means either
      keeping the whole gradient of the stage through the schedule (the 1/d of gradient memory lost) or
      reduce-scattering every microbatch's part (m·Ψ bytes instead of Ψ), and each unit is gathered 2m
      times instead of 2. And the tied table's two copies (first and last stage) must be summed whole
      before their mean: 1/d slices of two differently placed buffers cannot be. ZeRO-1 and ZeRO-2 shard
      a pipeline stage's state after the schedule instead (``--zero 1`` or ``--zero 2`` with pp).
    """
    if mesh is None:
        raise ValueError("ZeRO-3 shards every parameter over the data-parallel replicas: give it the mesh")
    if mesh.pp_size > 1:
        raise ValueError(f"ZeRO-3 on pipeline stages (pp = {mesh.pp_size}) is refused: a stage's m microbatches "
                         "interleave their forwards and backwards, so each unit's gradient is complete only "
                         "after m backwards -- held whole through the schedule (no 1/d gradient memory) or "
                         "reduce-scattered m times (m·Ψ bytes), each unit gathered 2m times -- and the tied "
                         "table's two copies must be summed whole before their mean. Use --zero 1 or 2 with pp")


class FullyShardedOptimizer(ZeroOptimizer):
    """``optimizer``'s parameters sharded over ``replicas(mesh)`` unit by unit (module docstring): ZeRO
    stage 3. Built on ``model`` (a GPT: ``nn.GPT`` or ``ParallelGPT``) right after ``optimizer``; from
    then on the model's parameters are placeholders outside the units being computed.

    Like ZeRO-1 it is its own gradient synchronisation (``gradient_sync``: ``start_step``, ``finish``,
    ``clip_grad_norm``), so ``minitp.training.train_step`` runs it unchanged; ``step`` updates the slices
    only. ``full_parameters()`` gathers everything (checkpoints, comparisons); ``gathered()``,
    ``state_dict`` and ``load_state_dict`` are ZeRO-1's (the optimizer state, full or this rank's slices).
    ``master_dtype`` and ``reduce_dtype``: mixed precision, as ``ZeroOptimizer``'s (module docstring).
    ``ValueError`` for a mesh ``check_mesh`` refuses, a model that is not a GPT, or an optimizer that does
    not hold exactly the model's parameters (or is a ``MasterWeights``).
    """

    stage = 3

    def __init__(self, optimizer, model, mesh, overlap=False, master_dtype=None, reduce_dtype=None):
        check_mesh(mesh)
        self._precision(optimizer, master_dtype)
        found = gpt_units(model)
        in_units = {id(p) for unit, _, _ in found for p in unit.parameters}
        if in_units != {id(p) for p in optimizer.params} or len(in_units) != len(optimizer.params):
            raise ValueError("ZeRO-3 shards the model's parameters unit by unit: the optimizer must hold exactly "
                             "model.named_parameters()")
        self.optimizer, self.mesh, self.model = optimizer, mesh, model
        self.group = replicas(mesh)
        self.keys, self.params = optimizer.keys, optimizer.params
        self.gradients = ShardedUnits(found, self.group, overlap, reduce_dtype)
        self._setup()

    def _parameter_shard(self, index):
        return self.gradients.shards[index]  # the parameters' only copy here: updated in place

    @contextlib.contextmanager
    def full_parameters(self, write_back=False):
        """Every unit gathered for the block's duration (FSDP's ``summon_full_params``): the parameters
        whole, e.g. to save or compare them. ``write_back``: what the block wrote into them becomes each
        rank's slices (loading a checkpoint). Collective over ``self.group``."""
        units = self.gradients
        for index in range(len(units.units)):
            units.gather(index, "everything")
        try:
            yield self.model
            if write_back:
                for index in range(len(units.units)):
                    units.keep_slice(index)
        finally:
            for index in range(len(units.units)):
                units.free(index)

    def held_bytes(self):
        """Parameter bytes this rank holds now: its slices, and every unit gathered at this moment."""
        return self.gradients.held_bytes()


class ShardedUnits:
    """The units of one model over ``group``: their slices (``shards``), gathering and freeing, and the
    gradient synchronisation's side of ZeRO-1's interface (``buckets``, ``grad_shards``, ``received``,
    ``start_step``, ``wait``), so that ``ZeroOptimizer``'s norm, update and state code serve stage 3.
    ``reduce_dtype``: the gradients packed, reduce-scattered and sliced in it (None: the parameters')."""

    def __init__(self, found, group, overlap, reduce_dtype=None):
        self.group, self.overlap, self.reduce_dtype = group, overlap, reduce_dtype
        d, r = group.size, group.rank
        self.units = [unit for unit, _, _ in found]
        self.buckets = [Bucket(unit.parameters, d) for unit in self.units]
        self.where = {id(p): index for index, unit in enumerate(self.units) for p in unit.parameters}
        # this rank's slice of each unit, copied out of the whole parameters the model was built with
        self.shards = []
        for bucket in self.buckets:
            lo, hi = bucket.shard_range(r, d)
            self.shards.append(bucket.pack([p.data for p in bucket.parameters])[lo:hi].copy())
        self.full = [None] * len(self.units)  # the gathered buffer of each unit, while it is gathered
        self.prefetching = [None] * len(self.units)  # a started all-gather
        self.grad_shards = [None] * len(self.units)
        self.received = [None] * len(self.units)
        self.accumulations, self._arrived = 1, [0] * len(self.units)
        self._reducing = None  # (index, request): the reduce-scatter in flight (overlap)
        self._names = {}  # (address, shape, strides) of a gathered parameter (or its transpose) -> its name
        self._placeholders = {}
        for bucket in self.buckets:
            for p in bucket.parameters:
                p.data = self._placeholder(p)
        for index, (unit, opener, closer) in enumerate(found):
            _hook(opener, lambda *_, index=index: self.open(index))
            _hook(closer, lambda module, args, output, index=index: self.close(index, output))
        for p in self.where_parameters():
            p.register_post_accumulate_grad_hook(self._gradient_ready)

    def where_parameters(self):
        return [p for unit in self.units for p in unit.parameters]

    def __len__(self):
        return len(self.buckets)

    # -- gathering and freeing ----------------------------------------------------------------------

    def _placeholder(self, p):
        """A read-only broadcast of one NaN in ``p``'s shape: its shape, one element of memory."""
        key = (p.dtype.str, type(p.data))
        if key not in self._placeholders:
            xp = backend.array_module(p.data)
            self._placeholders[key] = xp.full((), math.nan, dtype=p.dtype)
        return backend.array_module(p.data).broadcast_to(self._placeholders[key], p.shape)

    def _start_gather(self, index, why):
        return comm.iall_gather(self.shards[index], self.group, tag=f"parameters: gather {self.units[index].name} ({why})")

    def prefetch(self, index, why):
        if 0 <= index < len(self.units) and self.full[index] is None and self.prefetching[index] is None:
            self.prefetching[index] = self._start_gather(index, why)

    def gather(self, index, why):
        """Unit ``index`` whole: its parameters become views of the gathered buffer."""
        if self.full[index] is not None:
            return
        request, self.prefetching[index] = self.prefetching[index], None
        if request is not None:
            full = request.wait()
        else:
            full = comm.all_gather(self.shards[index], self.group, axis=0,
                                   tag=f"parameters: gather {self.units[index].name} ({why})")
        self.full[index] = full
        bucket = self.buckets[index]
        for p, view in zip(bucket.parameters, bucket.views(full)):
            p.data = view
            address = backend.data_ptr(view)
            self._names[(address, view.shape, view.strides)] = (p, False)
            if view.ndim == 2:
                self._names[(address, view.shape[::-1], view.strides[::-1])] = (p, True)

    def free(self, index):
        """Unit ``index`` back to its slice: the gathered buffer released (nothing else refers to it)."""
        if self.full[index] is None:
            return
        with trace.span(f"free {self.units[index].name}", "compute"):
            for p in self.buckets[index].parameters:
                address = backend.data_ptr(p.data)
                self._names.pop((address, p.data.shape, p.data.strides), None)
                self._names.pop((address, p.data.shape[::-1], p.data.strides[::-1]), None)
                p.data = self._placeholder(p)
            self.full[index] = None

    def keep_slice(self, index):
        """This rank's slice of unit ``index`` taken from its gathered (and possibly rewritten) parameters."""
        bucket, d, r = self.buckets[index], self.group.size, self.group.rank
        lo, hi = bucket.shard_range(r, d)
        self.shards[index][...] = bucket.pack([p.data for p in bucket.parameters])[lo:hi]

    def held_bytes(self):
        """This rank's slices plus the units gathered now (a prefetch still in flight not counted)."""
        return sum(a.nbytes for a in self.shards) + sum(a.nbytes for a in self.full if a is not None)

    # -- a unit's forward region ----------------------------------------------------------------------

    def open(self, index):
        for used in self.units[index].uses:
            self.gather(used, "forward")
        if self.overlap:
            self.prefetch(index + 1, "forward")
        autograd.push_saved_hooks(self._pack, self._unpack)

    def close(self, index, output):
        autograd.pop_saved_hooks()
        self._release_views(index, output)
        for used in self.units[index].uses:
            self.free(used)
        if getattr(output, "requires_grad", False):
            return GatherForBackward.apply(output, units=self, index=index)
        return output

    def _release_views(self, index, output):
        """An op's output that is a view of a gathered parameter (the tied head's wteᵀ) stays in the graph
        as the next op's input, and would keep the whole buffer alive: it becomes a placeholder of its
        shape (no backward reads an input's array; what an op needs it saved, and that is packed). The
        walk covers this unit's ops only: it stops at leaves and at the previous unit's mark."""
        owners = {id(full if full.base is None else full.base) for full in
                  (self.full[used] for used in self.units[index].uses) if full is not None}
        stack, seen = [output], set()
        while stack:
            tensor = stack.pop()
            fn = getattr(tensor, "_fn", None)
            if fn is None or id(tensor) in seen or isinstance(fn, GatherForBackward):
                continue
            seen.add(id(tensor))
            if tensor is not output and id(getattr(tensor.data, "base", None)) in owners:
                tensor.data = self._placeholder(tensor)
            stack.extend(fn.inputs)

    def _pack(self, array):
        key = _key(array)
        return self._names.get(key, array) if key is not None else array

    def _unpack(self, packed):
        if type(packed) is not tuple:
            return packed
        p, transposed = packed
        if self.full[self.where[id(p)]] is None:
            raise RuntimeError(f"ZeRO-3: backward read a parameter of {self.units[self.where[id(p)]].name} that "
                               "is not gathered (its unit's output was not reached before its ops)")
        return p.data.T if transposed else p.data

    # -- a unit's backward ------------------------------------------------------------------------------

    def backward_gather(self, index):
        for used in self.units[index].uses:
            self.gather(used, "backward")
        if self.overlap:
            self.prefetch(index - 1, "backward")

    def start_step(self, microbatches=1):
        self.accumulations = microbatches
        self._arrived = [0] * len(self.units)

    def _gradient_ready(self, parameter):
        index = self.where[id(parameter)]
        self._arrived[index] += 1
        count = len(self.units[index].parameters)
        if self._arrived[index] % count:
            return
        # this unit's backward (of one microbatch) is over: no op reads its parameters until it reopens
        # (the tied head frees the embeddings unit too; the embedding's own backward gathers it again)
        for used in self.units[index].uses:
            self.free(used)
        if self._arrived[index] == count * self.accumulations:
            self._reduce(index)

    def _reduce(self, index):
        """Unit ``index``'s gradients reduce-scattered; the full ones dropped (ZeRO-2's rule, per unit)."""
        bucket = self.buckets[index]
        self.received[index] = [p.grad is not None for p in bucket.parameters]
        flat = bucket.pack([p.grad for p in bucket.parameters], self.reduce_dtype)
        for p in bucket.parameters:
            p.grad = None
        tag = f"gradients: reduce-scatter {self.units[index].name}"
        self._settle()
        if self.overlap:
            self._reducing = (index, comm.ireduce_scatter(flat, self.group, tag=tag))
        else:
            self._finished(index, comm.reduce_scatter(flat, self.group, tag=tag))

    def _settle(self):
        if self._reducing is not None:
            index, request = self._reducing
            self._reducing = None
            self._finished(index, request.wait())

    def _finished(self, index, reduced):
        reduced /= self.group.size
        self.grad_shards[index] = reduced
        self._arrived[index] = -1  # done this step

    def wait(self):
        """After the last backward: every unit's slice of the mean gradient (units whose parameters got no
        gradient are reduced here, zeros in their slots) and every unit freed."""
        self._settle()
        for index in range(len(self.units)):
            if self._arrived[index] != -1:
                self._reduce(index)
                self._settle()
            self.free(index)
            self._arrived[index] = 0
        for index in range(len(self.units)):
            request, self.prefetching[index] = self.prefetching[index], None
            if request is not None:
                request.wait()  # a prefetch no one used (the step ended): completed, then dropped
        return len(self.units)


class GatherForBackward(Function):
    """Identity forward on a unit's output; its backward -- reached before any op of the unit, since they
    all lie below this output -- gathers the unit again (FSDP's pre-backward hook)."""

    def forward(self, x, units=None, index=None):
        self.units, self.index = units, index
        return x

    def backward(self, grad):
        self.units.backward_gather(self.index)
        return grad


def _key(array):
    if not hasattr(array, "strides"):
        return None
    return backend.data_ptr(array), array.shape, array.strides


def _hook(where, call):
    module, when = where
    if when == "pre":
        module.register_forward_pre_hook(call)
    else:
        module.register_forward_hook(call)
