"""Optimizers: SGD (with momentum) and AdamW, updating parameters in place from their ``.grad``.

They read ``.grad`` and never write into it: the engine may hand the same gradient array to two tensors
(the two inputs of an add receive one array), so an in-place change would corrupt the other.
Parameters whose ``.grad`` is None (no gradient reached them) are skipped, as in torch.

``state_dict()`` holds the step count and the per-parameter buffers keyed by the parameter's name when
the optimizer was built from ``model.named_parameters()``, else by its index: a checkpoint can then
save them, and a tensor-parallel run can cut each buffer into shards exactly as it cuts the weight.
"""
import math

import numpy

from minitp import backend, kernels
from minitp.blocks import blocks
from minitp.nn.module import Parameter


def clip_coefficient(norm, max_norm, eps=1e-6):
    """The factor by which clipping to ``max_norm`` scales a gradient whose global 2-norm is ``norm``:

        coef = max_norm / (norm + eps), applied iff coef < 1         (else 1: the gradient is left alone)

    torch's ``clip_grad_norm_`` (which clamps the same coef at 1). The eps keeps the division finite at
    norm = 0, and it makes a norm just below max_norm (within eps) scaled a little too: coef < 1 iff
    norm > max_norm - eps. ONE rule for every path that clips -- ``data_parallel.clip_grad_norm`` on
    whole ``.grad`` arrays and ``ZeroOptimizer.clip_grad_norm`` on the ZeRO-1 slices -- so the two never
    disagree near max_norm. ``max_norm=None``: 1 (measure only). ``ValueError`` for a max_norm that is
    not positive: a negative one would flip the gradient (ascend the loss), 0 would zero it."""
    check_max_norm(max_norm)
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + eps))


def check_max_norm(max_norm):
    """``ValueError`` unless ``max_norm`` is None or positive: what ``clip_coefficient`` refuses, for a
    caller to check before it sends anything (every rank checks the same number, so every rank raises)."""
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be positive, not {max_norm}")


class Optimizer:
    """The bookkeeping shared by every optimizer: the parameters, their keys, the per-key state."""

    def __init__(self, params):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got no parameters")
        if all(isinstance(p, tuple) for p in params):  # from model.named_parameters()
            self.keys = [name for name, _ in params]
            self.params = [p for _, p in params]
        else:
            self.keys = list(range(len(params)))
            self.params = params
        for key, p in zip(self.keys, self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{type(self).__name__}: parameter {key!r} is a {type(p).__name__}, "
                                "not a Parameter")
        self.step_count = 0  # how many times step() ran
        self.state = {}  # key -> {"step": int, buffer name: array}, made at the parameter's first update

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.step_count += 1
        for key, p in zip(self.keys, self.params):
            if p.grad is None:
                continue
            if p.grad.shape != p.shape:
                raise ValueError(f"{type(self).__name__}: gradient of shape {p.grad.shape} for parameter "
                                 f"{key!r} of shape {p.shape}")
            state = self.state.setdefault(key, {"step": 0})
            state["step"] += 1
            self._update_parameter(key, p, state)

    def _update_parameter(self, key, p, state):
        """Update the Parameter ``p`` from its ``.grad``. Here ``_update`` on ``p``'s own array; a wrapper
        that keeps another copy of the weights (``master_weights.MasterWeights``) updates that one instead."""
        self._update(p.data, p.grad, state)

    def _update(self, param, grad, state):
        """Update the array ``param`` in place from ``grad`` (read only) and this parameter's ``state``
        (``state["step"]`` counts this parameter's updates, this one included)."""
        raise NotImplementedError

    def state_bytes(self):
        """The bytes of every per-parameter buffer this optimizer keeps (AdamW: its two moments; with
        ``MasterWeights`` also the master copies: the K·Ψ of the ZeRO paper's 2Ψ + 2Ψ + KΨ), counted once
        every parameter has been updated -- each parameter's buffers are made at its first update."""
        arrays = [a for entry in self.state.values() for name, a in entry.items() if name != "step"]
        return sum(int(backend.array_module(a).asarray(a).nbytes) for a in arrays)

    def state_dict(self):
        """{"step": int, "state": {key: {"step": int, buffer: a copy of the array}}}.

        Every buffer has its parameter's shape, so it can be sharded like the parameter. Copies: later
        steps do not leak into a checkpoint already taken.
        """
        return {"step": self.step_count,
                "state": {key: {name: value if name == "step" else value.copy() for name, value in entry.items()}
                          for key, entry in self.state.items()}}

    def state_dtype(self, param):
        """The dtype this optimizer keeps ``param``'s state buffers in: the parameter's own (a wrapper that
        keeps them wider, ``master_weights.MasterWeights``, says its master dtype). ``load_state_dict``
        casts every loaded buffer to it."""
        return param.dtype

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict()`` returned, each buffer a copy in ``state_dtype``; unknown keys or
        wrong shapes raise ValueError."""
        params = dict(zip(self.keys, self.params))
        state = {}
        for key, entry in state_dict["state"].items():
            if key not in params:
                raise ValueError(f"{type(self).__name__}.load_state_dict: unknown parameter {key!r} "
                                 f"(this optimizer has {self.keys})")
            param = params[key]
            xp = backend.array_module(param.data)
            state[key] = {"step": int(entry["step"])}
            for name, array in entry.items():
                if name == "step":
                    continue
                if tuple(array.shape) != param.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {name} of parameter {key!r} "
                                     f"has shape {tuple(array.shape)}, the parameter {param.shape}")
                array = backend.to_host(array) if xp is numpy else array
                state[key][name] = xp.array(array, dtype=self.state_dtype(param))  # a copy on the parameter's device
        self.step_count = int(state_dict["step"])
        self.state = state


class SGD(Optimizer):
    """p <- p - lr * v with v <- momentum * v + g (torch's SGD; v starts at the first g).

    ``momentum=0`` is plain gradient descent and keeps no buffer.
    """

    def __init__(self, params, lr, momentum=0.0):
        super().__init__(params)
        self.lr, self.momentum = lr, momentum

    @property
    def state_buffers(self):
        """The arrays kept per parameter (a checkpoint must hold each of them, or none)."""
        return ("momentum",) if self.momentum else ()

    def _update(self, param, grad, state):
        if not self.momentum:
            param -= self.lr * grad
            return
        if "momentum" not in state:
            state["momentum"] = grad.copy()  # a copy: the velocity is updated in place, grad never is
        else:
            state["momentum"] *= self.momentum
            state["momentum"] += grad
        param -= self.lr * state["momentum"]


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov and Hutter 2019, algorithm 2; torch.optim.AdamW).

    At step t of a parameter p with gradient g:

        p   <- p - lr * weight_decay * p              decay first, and not through the gradient
        m   <- beta1 * m + (1 - beta1) * g            first moment  (m, v start at 0)
        v   <- beta2 * v + (1 - beta2) * g^2          second moment
        p   <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    "Decoupled": the decay shrinks p directly, so it is not rescaled by Adam's 1/sqrt(v) as an L2 term
    added to g would be. A parameter whose gradient is zero still decays.
    """

    state_buffers = ("exp_avg", "exp_avg_sq")  # per parameter: a checkpoint must hold both, or neither

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay

    def _update(self, param, grad, state):
        beta1, beta2 = self.betas
        xp = backend.array_module(param)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(param), xp.zeros_like(param)
        exp_avg, exp_avg_sq, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        if kernels.enabled(param):  # on a GPU: the passes below in one (minitp.kernels)
            from minitp.kernels.elementwise import adamw
            adamw(param, grad, exp_avg, exp_avg_sq, self.lr, self.betas, self.eps, self.weight_decay, t)
            return
        # Each step below is one pass, in place or into a scratch block (torch's in-place mul_/addcmul_/
        # addcdiv_), over a block of the flattened arrays at a time, so that every pass after the first
        # reads from the L2 cache (minitp.blocks). The operations and their order are the
        # formulas', so the values are too.
        bias_correction1, bias_correction2 = 1 - beta1 ** t, 1 - beta2 ** t
        arrays = param, grad, exp_avg, exp_avg_sq
        parts = [...]  # the whole arrays as one block, unless they are contiguous: then flat views in blocks
        if param.flags.c_contiguous and exp_avg.flags.c_contiguous and exp_avg_sq.flags.c_contiguous:
            arrays, parts = [a.reshape(-1) for a in arrays], blocks(param.size, xp)
        scratch, denominator = (xp.empty_like(arrays[0][parts[0]]) for _ in range(2))
        for part in parts:
            p, g, m, v = (a[part] for a in arrays)
            buffer, denominator_ = scratch[:p.shape[0]], denominator[:p.shape[0]]
            if self.weight_decay:
                p *= 1 - self.lr * self.weight_decay
            m *= beta1
            xp.multiply(g, 1 - beta1, out=buffer)
            m += buffer
            v *= beta2
            xp.multiply(g, 1 - beta2, out=buffer)
            buffer *= g
            v += buffer
            # bias correction folded into the step size and the denominator, as torch does:
            # m_hat / (sqrt(v_hat) + eps) = (m / c1) / (sqrt(v) / sqrt(c2) + eps)
            xp.sqrt(v, out=denominator_)
            denominator_ /= math.sqrt(bias_correction2)
            denominator_ += self.eps
            xp.multiply(m, self.lr / bias_correction1, out=buffer)
            buffer /= denominator_
            p -= buffer
