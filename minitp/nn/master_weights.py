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
takes its keys and its elementwise ``_update``, and keeps the state itself, in ``master_dtype``). ``lr``
reads and writes the wrapped optimizer's, so a schedule sets it the same way. Its exactness is testable:
with float64 as both the "low" and the master dtype, it must equal the plain optimizer to the last bit.
"""
import numpy

from minitp import backend
from minitp.nn.optim import Optimizer


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
        self.master = {key: p.data.astype(self.master_dtype) for key, p in zip(self.keys, self.params)}  # copies

    @property
    def lr(self):
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    def _update_parameter(self, key, p, state):
        master = self.master[key]
        self.optimizer._update(master, p.grad.astype(self.master_dtype, copy=False), state)
        p.data[...] = master.astype(p.dtype, copy=False)

    def load_state_dict(self, state_dict):
        """Refused: the plain one would load the moments in the model's dtype and leave the master copies
        as they were built, so the next step would write stale weights back (checkpoints of the masters:
        not built)."""
        raise NotImplementedError("MasterWeights.load_state_dict: resuming with master weights is not built")

    def state_bytes(self):
        """Bytes this wrapper keeps beyond the model: the master copies and the moments (the K·Ψ of the
        ZeRO paper's 2Ψ + 2Ψ + KΨ, K = 12 for fp32 AdamW over an fp16 model)."""
        arrays = list(self.master.values()) + [a for entry in self.state.values() for name, a in entry.items()
                                              if name != "step"]
        return sum(int(backend.array_module(a).asarray(a).nbytes) for a in arrays)
