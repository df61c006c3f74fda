"""Why master weights? An update below the low precision's resolution vanishes.

fp16 has 10 bits of mantissa: next to 1.0 the nearest other number is 1 + 2^-10 ≈ 1.001, so a weight of
1.0 that AdamW moves by lr = 1e-4 rounds straight back to 1.0 -- every step, forever. Mixed precision
(Micikevicius et al. 2018, "Mixed Precision Training"; the ZeRO paper's 2Ψ + 2Ψ + 12Ψ) keeps a copy of
every weight in fp32, the MASTER weights, with the optimizer's moments beside them in fp32 too:

    g32  = grad.astype(master)          the low-precision gradient, widened (exact: every fp16 is an fp32)
    update the master w32 with g32      the wrapped optimizer's own elementwise update, moments in fp32
    w16  = w32.astype(model dtype)      the model computes with the rounded copy

The small updates accumulate in w32 until they cross a step of w16's grid.

``MasterWeights`` wraps an optimizer built as usual on the model's parameters (like ZeRO's wrappers: it
takes its keys and its elementwise ``_update``). ``lr`` reads and writes the wrapped optimizer's, so a
schedule sets it the same way. Its exactness is testable: with float64 as both the "low" and the master
dtype, it must equal the plain optimizer to the last bit.

**The masters are optimizer state.** Each parameter's master copy is a state buffer named "master", in
``state[key]`` beside the moments (all in ``master_dtype``), so ``state_dict()`` returns it and a
checkpoint saves it (``minitp.checkpoint``: ``optimizer/master/<name>``, fp32) -- the master weights are
what is saved; the model's fp16 weights are only their rounding. It is made at the parameter's first
update from ``p.data.astype(master_dtype)``, like the moments. That equals a copy made at construction:
nothing but this optimizer changes the weights before their first update (and a checkpoint loaded
without optimizer state writes the weights that the copy is then made from). ``load_state_dict`` keeps
every buffer in ``master_dtype`` (``state_dtype``: the base class would cast to the parameters' fp16,
rounding the masters away) and writes the parameters from the loaded masters, so model and masters agree.
"""
import numpy

from minitp.nn.optim import Optimizer


def master_of(state, weights, master_dtype):
    """The master copy in optimizer ``state`` (its "master" buffer), made from ``weights`` at the first
    update -- widened, exact, so equal to a copy made at construction -- and kept from then on: the small
    updates add up in it. ``MasterWeights`` passes a whole parameter, ZeRO this rank's piece of a slice."""
    if "master" not in state:
        state["master"] = weights.astype(master_dtype)  # a copy, even in the same dtype
    return state["master"]


class MasterWeights(Optimizer):
    """``optimizer``'s update applied to ``master_dtype`` copies of its parameters, rounded down to the
    parameters' own dtype after each step. Gradients may be in either dtype (a loss scaler's unscaled
    gradients are already in the master dtype: ``loss_scale.DynamicLossScaler.unscale``).

    An ``Optimizer`` over the same keys and parameters: its ``step`` (the skip of a parameter without a
    gradient, the step counts, the per-key state) is the plain one; only what one parameter's update
    writes differs (``_update_parameter``)."""

    def __init__(self, optimizer, master_dtype=numpy.float32):
        super().__init__(zip(optimizer.keys, optimizer.params))
        self.optimizer, self.master_dtype = optimizer, numpy.dtype(master_dtype)

    @property
    def lr(self):
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    @property
    def state_buffers(self):
        """The arrays kept per parameter: the wrapped optimizer's and the master copy (a checkpoint must
        hold each of them, or none)."""
        return tuple(getattr(self.optimizer, "state_buffers", ())) + ("master",)

    def state_dtype(self, param):
        """Every buffer -- the master and the moments -- is kept in the master dtype, whatever ``param``'s."""
        return self.master_dtype

    @property
    def master(self):
        """{key: master copy} (read only): the state's "master" buffer of each updated parameter; for one
        not updated yet, its weights widened -- what its master will be made from at its first update."""
        return {key: self.state[key]["master"] if "master" in self.state.get(key, {})
                else p.data.astype(self.master_dtype) for key, p in zip(self.keys, self.params)}

    def _update_parameter(self, key, p, state):
        master = master_of(state, p.data, self.master_dtype)
        self.optimizer._update(master, p.grad.astype(self.master_dtype, copy=False), state)
        p.data[...] = master.astype(p.dtype, copy=False)

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict()`` returned, every buffer in the master dtype, then write each
        parameter from its master (rounded to the parameter's dtype: what a step writes). ``ValueError``,
        before anything is loaded, for a parameter whose state has no "master" (a plain optimizer's
        state): its master would be remade from the rounded weights, and the run would drift from the
        one that saved it."""
        missing = [key for key, entry in state_dict["state"].items() if "master" not in entry]
        if missing:
            raise ValueError(f"MasterWeights.load_state_dict: no master weights for parameter(s) {missing[:4]}"
                             + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                             + " (a plain optimizer's state?): they would be remade from the rounded weights")
        super().load_state_dict(state_dict)  # each buffer a copy in state_dtype: the master dtype
        for key, p in zip(self.keys, self.params):
            if key in self.state:
                p.data[...] = self.state[key]["master"].astype(p.dtype, copy=False)

