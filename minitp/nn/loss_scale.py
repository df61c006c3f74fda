"""Why scale the loss? Small gradients underflow in fp16.

fp16's smallest positive number is 2^-24 ≈ 6e-8 (2^-14 ≈ 6e-5 the smallest normal): a gradient of 1e-8
-- common deep in a network, for a loss averaged over many tokens -- becomes 0 in fp16, and that weight
never learns. Multiply the loss by S before backward, and every gradient is S times larger (backward is
linear in its seed): 1e-8 · 2^16 ≈ 6.6e-4 is an fp16 number. Divide by S again in fp32 (``unscale``),
before clipping (the norm is of the true gradient) and before the optimizer.

Too large an S overflows instead (fp16's largest is 65,504): a gradient becomes inf or NaN. DYNAMIC loss
scaling (Micikevicius et al. 2018; torch.cuda.amp.GradScaler; Megatron's DynamicGradScaler) keeps S as
large as it can:

    inf or NaN in any gradient   skip the step (no weight, no moment changes), S <- S · backoff (½)
    growth_interval clean steps  S <- S · growth (2)

bf16 needs none of this: its exponent is fp32's (smallest normal 1e-38), it loses mantissa, not range.

The inf/NaN test must agree on every rank (a tensor-parallel rank holds other slices of the gradient,
a ZeRO rank other slices of the flat buckets): ``unscale`` takes a ``world`` communicator and ORs the
finding over it, so every rank skips alike.

**Where the gradients are.** ``unscale`` works on a gradient synchronisation (``minitp.parallel.data.sync``:
``final_gradients()``, ``map_gradients(fn)``) after its ``finish()``: the ``.grad`` arrays of plain data
parallelism, or this rank's slices of ZeRO's buckets (stages 1, 2 and 3) -- so ``train_step`` calls it the
same way for every optimizer. A plain list of parameters is accepted too (their ``.grad``). It runs after
the reduction: an fp16 sum over the replicas can overflow where no single gradient did, and that step
must be skipped as well.
"""
import numpy
from mpi4py import MPI

from minitp import backend


class DynamicLossScaler:
    """The loss scale S and its rules (module docstring), S at most ``max_scale``."""

    def __init__(self, scale=2.0 ** 15, growth=2.0, backoff=0.5, growth_interval=1000, max_scale=2.0 ** 15):
        if not (scale > 0 and growth > 1 and 0 < backoff < 1 and growth_interval >= 1):
            raise ValueError(f"DynamicLossScaler needs scale > 0, growth > 1, 0 < backoff < 1 and growth_interval "
                             f">= 1, not {scale}, {growth}, {backoff}, {growth_interval}")
        self.scale, self.growth, self.backoff, self.growth_interval = float(scale), growth, backoff, growth_interval
        # backward's seed IS S, in the model's dtype (this engine computes the loss in it too, where torch's
        # autocast keeps the loss in fp32): fp16's largest power of two is 2^15 (65,504 the largest number)
        self.max_scale = max_scale
        self.clean_steps, self.skipped = 0, 0

    def unscale(self, gradients, dtype=numpy.float32, world=None):
        """Replace every final gradient of ``gradients`` -- a synchronisation after its ``finish()`` (module
        docstring), or a list of parameters (their ``.grad``) -- by ``gradient / S`` in ``dtype`` (the master
        dtype: in fp16 the division would underflow again); True when some gradient -- on any rank of
        ``world`` -- is inf or NaN (then the gradients are left as they are: the step is to be skipped).
        One all-reduce of one flag over ``world``, on every rank, found or not."""
        sync = gradients if hasattr(gradients, "map_gradients") else ParameterGradients(gradients)
        found = any(not bool(backend.array_module(g).isfinite(g).all()) for g in sync.final_gradients())
        if world is not None and world.Get_size() > 1:
            found = bool(world.allreduce(found, op=MPI.LOR))
        if not found:
            scale = numpy.dtype(dtype).type(self.scale)

            def unscaled(g):
                g = g.astype(dtype)  # a new array (the engine's may be shared, a bucket's view): divided in place
                g /= scale
                return g
            sync.map_gradients(unscaled)
        return found

    def update(self, found_inf):
        """After a step (or its skip): back off on an overflow, grow after ``growth_interval`` clean steps."""
        if found_inf:
            self.scale *= self.backoff
            self.clean_steps, self.skipped = 0, self.skipped + 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale = min(self.scale * self.growth, self.max_scale)
            self.clean_steps = 0


class ParameterGradients:
    """The synchronisation interface's ``final_gradients``/``map_gradients`` over a list of parameters:
    their ``.grad`` arrays (plain data parallelism's ``AllReduceGradients`` answers with these too)."""

    def __init__(self, params):
        self.params = list(params)

    def final_gradients(self):
        return [p.grad for p in self.params if p.grad is not None]

    def map_gradients(self, fn):
        for p in self.params:
            if p.grad is not None:
                p.grad = fn(p.grad)
